"""The output folder of ``adn train``: one run owns it at a time.

Two runs writing one folder used to overwrite each other's checkpoints and interleave their logs, and a
fresh run in a folder left by an earlier one mixed the two (with ``--keep-last``, the old run's numbered
checkpoints even outlived the new ones). So a run

- takes a lock file in the folder (``.adn-train.lock``, holding its PID). The lock is an OS file lock
  (``flock``), which the kernel drops when the process dies however it dies, so a lock file left by a
  killed run is recognised as stale and taken over, with a message; a live run's lock is refused;
- refuses a folder holding another run's files (checkpoints, ``log.jsonl``) unless it resumes
  (``--resume``) or is told to replace them (``--overwrite``).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from ..utils.atomic import atomic_write
from ..utils.atomic import remove_stale_temporaries as remove_temporaries
from ..utils.checkpoint_file import LATEST, atomic_save, numbered_checkpoints, numbered_name

LOCK_NAME = ".adn-train.lock"
LOG_NAME = "log.jsonl"

try:  # POSIX; elsewhere the PID in the file is checked instead
    import fcntl
except ImportError:  # pragma: no cover  (Windows)
    fcntl = None


class OutputDirError(ValueError):
    """The output folder is in use by another run or holds another run's files."""


def check_writable(folder: str | os.PathLike) -> None:
    """Fail early, without creating anything, if ``folder`` could not be created or written: the nearest
    existing folder above it must be a writable folder (the data set and model are loaded before the
    folder is made, so that a failed start leaves no empty folder behind)."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(
            f"cannot write to output directory {folder}: {existing} is a file, not a folder; "
            f"choose another --output-dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(
            f"cannot write to output directory {folder}: {existing} is not writable "
            f"(permission denied); choose another --output-dir"
        )


def previous_run_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a run in ``folder``: ``checkpoint.pt``, the numbered checkpoints, ``log.jsonl``."""
    folder = Path(folder)
    files = [folder / LATEST] if (folder / LATEST).is_file() else []
    files += numbered_checkpoints(folder)
    if (folder / LOG_NAME).is_file():
        files.append(folder / LOG_NAME)
    return files


class RunLock:
    """The lock of one run on its output folder; :meth:`release` (or process death) frees it."""

    def __init__(self, folder: str | os.PathLike, log=print):
        self.path = Path(folder) / LOCK_NAME
        self.handle = None
        self.log = log

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retried if another run removed the file between our open and our lock
            handle = open(self.path, "a+")
            try:
                owner = self._lock(handle)
            except BaseException:
                handle.close()
                raise
            if owner is None and self._still_the_file(handle):
                self.handle = handle
                self._announce_takeover(handle)
                self._write_owner(handle)
                return self
            handle.close()
            if owner is not None:
                raise OutputDirError(
                    f"output directory {self.path.parent} is in use by another adn train "
                    f"({owner}); two runs in one folder overwrite each other's checkpoints. Wait for "
                    f"it to finish or stop it, or choose another --output-dir"
                )
        raise OutputDirError(f"could not lock {self.path}: it keeps being replaced; choose another --output-dir")

    def _lock(self, handle) -> str | None:
        """Lock ``handle``'s file; returns None on success, else a description of the holder."""
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                return _describe(handle) or "another process"
        owner = _owner_pid(handle)  # no OS lock: trust the PID written in the file
        return _describe(handle) if owner and owner != os.getpid() and _alive(owner) else None

    def _still_the_file(self, handle) -> bool:
        """Whether the locked file is still the one at ``self.path`` (a releasing run deletes it)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def _announce_takeover(self, handle) -> None:
        previous = _describe(handle)
        if previous:  # a lock file nobody holds: its run was killed before it could remove it
            self.log(
                f"adn: taking over the lock of a run that is no longer running ({previous}; it was "
                f"killed or crashed): {self.path}"
            )

    def _write_owner(self, handle) -> None:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()

    def release(self) -> None:
        if self.handle is None:
            return
        self.path.unlink(missing_ok=True)  # removed while still locked: no other run can take a dying file
        self.handle.close()  # closing drops the OS lock
        self.handle = None


def _describe(handle) -> str:
    handle.seek(0)
    return handle.read().strip()


def _owner_pid(handle) -> int | None:
    words = _describe(handle).split()
    return int(words[1]) if len(words) > 1 and words[0] == "pid" and words[1].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def claim(folder: str | os.PathLike, resume: str | None, overwrite: bool, log=print) -> RunLock:
    """Lock ``folder`` for this run and make sure it holds no other run's files: with ``resume`` they are
    this run's own past; with ``overwrite`` they are deleted; otherwise the folder is refused."""
    lock = RunLock(folder, log).acquire()
    try:
        found = previous_run_files(folder)
        if found and not resume:
            if not overwrite:
                raise OutputDirError(
                    f"output directory {folder} holds another run's files ({_names(found)}); a new run there would "
                    f"mix its checkpoints and log with them. Continue that run with --resume "
                    f"{Path(folder) / LATEST}, replace it with --overwrite, or choose another --output-dir"
                )
            for path in found:
                path.unlink(missing_ok=True)
            log(f"adn: --overwrite: deleted the previous run's {_names(found)} in {folder}")
    except BaseException:
        lock.release()
        raise
    return lock


def _names(paths: list[Path]) -> str:
    numbered = [p for p in paths if p.name not in (LATEST, LOG_NAME)]
    parts = [p.name for p in paths if p.name in (LATEST, LOG_NAME)]
    if numbered:
        parts.append(f"{len(numbered)} numbered checkpoint(s) such as {numbered[-1].name}")
    return ", ".join(parts)


# ----- the checkpoints of a run: latest + the last K numbered ones ------------------------------------------
def save_rotating(folder: str | os.PathLike, payload: dict, epoch: int, step: int, keep_last: int) -> Path:
    """Write ``payload`` as ``folder/checkpoint.pt`` and, when ``keep_last`` > 0, as the numbered
    checkpoint of (epoch, step), deleting the numbered ones beyond the last ``keep_last``. Each file is
    replaced atomically; ``checkpoint.pt`` is a hard link to the numbered file (a copy where links are
    not supported), so the data is written once."""
    folder = Path(folder)
    latest = folder / LATEST
    if keep_last <= 0:
        atomic_save(payload, latest)
        return latest
    numbered = folder / numbered_name(epoch, step)
    atomic_save(payload, numbered)
    _publish(numbered, latest)
    for old in numbered_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return numbered


def replace_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Atomically replace the checkpoint ``path`` by ``payload``. A run's ``checkpoint.pt`` that is a hard
    link to its newest numbered checkpoint (``--keep-checkpoints``) stays one: both get the payload."""
    path = Path(path)
    if path.name == LATEST and path.is_file():
        newest = numbered_checkpoints(path.parent)[-1:]
        if newest and os.path.samefile(newest[0], path):
            atomic_save(payload, newest[0])
            _publish(newest[0], path)
            return
    atomic_save(payload, path)


def _publish(source: Path, target: Path) -> None:
    """Atomically make ``target`` a hard link to ``source`` (or a copy of it)."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.link.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:  # no hard links on this file system
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
        return
    os.replace(temporary, target)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed run left next to its checkpoints and log (they are hidden,
    named ``.<file>.<random>.tmp``; the files themselves are always whole)."""
    return remove_temporaries(folder, ("checkpoint", LOG_NAME))

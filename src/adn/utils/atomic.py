"""Atomic file writes: every file adn writes appears whole or not at all.

A write goes to a hidden temporary next to its target, ``.<name>.<random>.tmp``, which is renamed over
the target when complete. The writer holds an OS lock (``flock``) on its temporary while it writes: a
process killed mid-write (kill -9, a power cut) leaves its temporary behind, unlocked, and the next
command that writes the same target removes it (:func:`remove_stale_temporaries`); a temporary another
process is still writing stays locked and is left alone."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

try:  # POSIX; elsewhere temporaries are told apart by age
    import fcntl
except ImportError:  # pragma: no cover  (Windows)
    fcntl = None

# Without OS locks, a temporary untouched for this long is taken to be a killed writer's.
UNLOCKED_STALE_SECONDS = 24 * 3600


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, fsync it, then rename it to ``path``.
    A crash or an exception leaves the previous ``path`` (if any) untouched and no temporary file (a
    kill -9 leaves one, locked by nobody, which :func:`remove_stale_temporaries` recognises).
    ``suffix`` is the temporary file's extension, for writers that infer the format from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until this write ends: "in use"
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        os.close(fd)
    return path


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the hidden temporaries (``.<name>.<random>.tmp``) in ``folder`` that a killed writer left
    behind, for targets whose names start with one of ``names``; return those deleted. A temporary that
    another process is writing now (it holds its lock) is left alone."""
    names = tuple(names)
    removed = []
    try:
        candidates = list(Path(folder).glob(".*.tmp"))
    except OSError:
        return removed
    for path in candidates:
        if path.name[1:].startswith(names) and path.is_file() and not path.is_symlink() and not _in_use(path):
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed


def _in_use(path: Path) -> bool:
    """Whether a live writer holds the temporary ``path`` (its lock; without OS locks: touched recently)."""
    if fcntl is None:  # pragma: no cover
        import time

        try:
            return time.time() - path.stat().st_mtime < UNLOCKED_STALE_SECONDS
        except OSError:
            return True
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (closing drops the lock taken here)
    return False


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask

"""Where a command may write: the one rule every ``adn`` command that writes a file follows.

- A path that exists is replaced only when it holds the command's own earlier output, recognised by
  its content (an adn checkpoint, an adn export's manifest, a depth table, ...), or when the user says
  so with ``--overwrite``. A user's text file, photo or notes are never replaced silently.
- The command's input is never replaced, whatever the flags (the same file reached through another
  name, a symbolic link or a hard link included). ``adn recalibrate`` updating its checkpoint in place,
  its documented default, is the one command allowed to (``in_place``).
- Only a regular file or a new path is written: never a folder, a device (``/dev/null``), a pipe or a
  socket. A symbolic link is followed: its target is what the rule applies to, and what is replaced.
- What is written appears whole or not at all (:func:`adn.utils.atomic.atomic_write`), and the hidden
  temporaries that a killed earlier write of the same target left next to it are removed first.

:func:`output_path` checks all of this before a command loads anything, so that a wrong ``--output``
costs nothing; it returns the path to hand to the writer.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .atomic import remove_stale_temporaries


class OutputError(ValueError):
    """A path a command was asked to write that it must not, or cannot, write; the message says why and
    what to do instead."""


@dataclass(frozen=True)
class OutputKind:
    """What a command writes: ``what`` names it in messages ("an adn checkpoint"), ``example`` is a file
    name to suggest, and ``recognise(path)`` says whether an existing file is such output."""

    what: str
    example: str
    recognise: Callable[[Path], bool]


def output_path(
    path,
    kind: OutputKind,
    *,
    flag: str = "--output",
    overwrite: bool = False,
    inputs: Iterable[tuple[str, object]] = (),
    in_place: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The file to write for ``flag path`` (a symbolic link resolved to its target), after checking the
    rule of this module; raises :class:`OutputError` naming the real problem and a fix. ``inputs`` are
    ``(flag, path)`` pairs the command reads: none may be replaced, unless ``in_place`` allows it for the
    command's own output kind. Removes the stale temporaries of earlier killed writes of the target."""
    text = os.fspath(path) if path is not None else ""
    if not str(text).strip():
        raise OutputError(f"{flag} is empty: give the path of the file to write, e.g. {flag} {kind.example}")
    given = Path(text).expanduser()
    target = given.resolve()
    shown = f"{flag} {given}" + (f" (a link to {target})" if given.is_symlink() else "")
    try:
        info = target.stat()
    except (FileNotFoundError, NotADirectoryError):  # (a file in the way above it: _check_folder says so)
        info = None
    except OSError as error:
        raise OutputError(f"{shown}: cannot use it ({error.strerror or error}); choose another path") from error
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise OutputError(
                f"{shown} is a folder; give the path of a file to write, e.g. {flag} {given / kind.example}"
            )
        if not stat.S_ISREG(info.st_mode):
            raise OutputError(
                f"{shown} is {_special(info.st_mode)}, not a regular file: adn writes only regular "
                f"files (or new paths); give the path of a file, e.g. {flag} {kind.example}"
            )
        for input_flag, input_path in inputs:
            if input_path is not None and _same_file(target, Path(input_path).expanduser()):
                if in_place and kind.recognise(target):
                    break
                raise OutputError(
                    f"{shown} is this command's input ({input_flag} {input_path}); adn never replaces "
                    f"what it reads: choose another path for {flag}"
                )
        else:
            if not overwrite and not kind.recognise(target):
                raise OutputError(
                    f"{shown} exists and is not {kind.what} (adn replaces only its own earlier output); "
                    f"choose another path, or add --overwrite to replace it"
                )
    _check_folder(target, shown)
    removed = remove_stale_temporaries(target.parent, (target.name + ".",))
    if removed:
        (log or _stderr)(
            f"removed {len(removed)} temporary file(s) that an interrupted write of {target} left in {target.parent}"
        )
    return target


def output_folder(path, *, flag: str = "--output") -> Path:
    """A folder to write files into (it may not exist yet): refused when empty, when a file or a special
    file is there or in the way above it, or when it cannot be created or written."""
    text = os.fspath(path) if path is not None else ""
    if not str(text).strip():
        raise OutputError(f"{flag} is empty: give the folder to write into, e.g. {flag} export")
    folder = Path(text).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; give a folder (it is created if it does not exist)")
    _check_folder(folder / "x", f"{flag} {path}", folder_itself=True)
    return folder


def _check_folder(target: Path, shown: str, folder_itself: bool = False) -> None:
    """The folder ``target`` goes into must be a folder (or creatable) and writable: the temporary and
    the rename both happen there."""
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"{shown}: {existing} is a file, not a folder, so nothing can be written "
            f"{'there' if folder_itself else 'under it'}; choose another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"{shown}: the folder {existing} is not writable (permission denied); choose a path in a "
            f"folder you can write to"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _special(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _stderr(message: str) -> None:
    print(f"adn: {message}", file=sys.stderr)


# ----- recognising a command's own earlier output by its content --------------------------------------------
MAX_JSON_BYTES = 64 << 20  # a JSON file adn wrote is far smaller; larger ones are not read to recognise them


def json_file(path: Path, accept: Callable[[object], bool]) -> bool:
    """Whether ``path`` holds JSON that ``accept`` recognises (False for anything unreadable)."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            return False
        return bool(accept(json.loads(path.read_text(encoding="utf-8"))))
    except (OSError, ValueError, RecursionError):
        return False


def is_adn_checkpoint(path: Path) -> bool:
    """An adn checkpoint: a torch zip file whose pickle names the format ``adn-checkpoint`` (found without
    unpickling it: the format marker is a plain string in the record)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            record = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if record is None or archive.getinfo(record).file_size > MAX_JSON_BYTES:
                return False
            return b"adn-checkpoint" in archive.read(record)
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def is_matplotlib_png(path: Path) -> bool:
    """A PNG written by matplotlib (adn's plots): its header names the software."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"Matplotlib" in head


CHECKPOINT = OutputKind("an adn checkpoint", "model.pt", is_adn_checkpoint)
PLOT = OutputKind("a plot adn wrote (a matplotlib PNG)", "plot.png", is_matplotlib_png)

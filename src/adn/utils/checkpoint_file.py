"""The checkpoint *file format*: written atomically, loaded without executing pickled code.

A checkpoint is one ``torch.save`` file of plain containers and tensors, read back with
``torch.load(weights_only=True)`` after checking the CRC-32 of each of its records (which torch.load does
not check, so a flipped byte would otherwise load as a wrong weight):

    {"format": "adn-checkpoint", "version": 1,
     "meta": {"model": "resnet20", "num_classes": 10, "in_channels": 1, "skip_aware_norm": True, ...},
     "model": state_dict, "optimizer": ..., "epoch": int, ...}

A run keeps ``checkpoint.pt`` (the latest) and, with ``--keep-last K``, the last K numbered checkpoints
``checkpoint-e<epoch>-s<step>.pt`` beside it (:mod:`adn.training.run_folder` rotates them). What a
classification checkpoint's ``meta`` builds is :mod:`adn.vision.checkpoint`'s job.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, first_line
from .atomic import atomic_write

FORMAT = "adn-checkpoint"
LATEST = "checkpoint.pt"
NUMBERED = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.pt$")


def atomic_save(obj, path: str | os.PathLike, flag: str = "--output-dir") -> None:
    """``torch.save`` through :func:`adn.atomic.atomic_write`: a crash leaves either the old file or
    the new one, never a truncated one. A failed write is a :class:`CheckpointError` that names its cause
    (:func:`write_failure`) and says the previous file is intact; ``flag`` is the option that chose
    ``path`` (``--output-dir`` for training runs, ``--output`` for import-weights and recalibrate)."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as error:
        kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
        raise CheckpointError(f"could not write checkpoint {path}: {write_failure(error, flag)}; {kept}") from error


def write_failure(error: BaseException, flag: str) -> str:
    """Why a write failed, and what to do, from the error itself (a full disk is one cause among several)."""
    import errno

    number = getattr(error, "errno", None)
    detail = f"{type(error).__name__}: {first_line(error, 200)}"
    if number in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full or over its quota ({detail}). Free space, or choose another {flag}"
    if number in (errno.EACCES, errno.EPERM):
        return f"permission denied ({detail}). Choose a {flag} in a folder you can write to"
    if number == errno.EROFS:
        return f"the file system is read-only ({detail}). Choose a {flag} on a writable disk"
    if number == errno.EISDIR:
        return f"a folder is in the way ({detail}). Give {flag} the path of a file"
    if number in (errno.ENOENT, errno.ENOTDIR):
        return f"its folder is missing or a file is in the way ({detail}). Choose another {flag}"
    if isinstance(error, RuntimeError):  # torch's own writer ("unexpected pos", "file write failed")
        return f"torch could not write the data ({detail}): disk full, or a failing device. Free space, or choose another {flag}"
    return f"{detail}. Choose another {flag}"


def checkpoint_payload(net: nn.Module, meta: dict, **state) -> dict:
    """What a checkpoint file holds: format marker, metadata, weights, and ``state`` (optimizer, ...)."""
    return {"format": FORMAT, "version": 1, "meta": meta, "model": net.state_dict(), **state}


def save_checkpoint(path, net: nn.Module, meta: dict, **state) -> None:
    atomic_save(checkpoint_payload(net, meta, **state), path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        hint = f"; it holds {path / LATEST}" if (path / LATEST).is_file() else ""
        raise CheckpointError(
            f"checkpoint {path} is a folder, not a file: give the checkpoint file itself, e.g. {path / LATEST}{hint}"
        )
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist (adn train writes <output-dir>/checkpoint.pt)"
            f"{_earlier(path) if path.parent.is_dir() else ''}"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): its writer was stopped before writing anything, "
            f"or a copy failed{_earlier(path)}"
        )
    check_integrity(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, corrupted, or a pickle that needs code execution
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated, corrupted or not an adn checkpoint "
            f"({type(error).__name__}: {first_line(error, 200)}){_earlier(path)}"
        ) from error
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data or "meta" not in data:
        raise CheckpointError(f"{path} is not an adn checkpoint (expected a file written by adn train)")
    return data


def check_integrity(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` if a record of the ``torch.save`` file ``path`` fails its CRC-32.

    torch.save writes a zip whose records carry CRC-32s that torch.load never checks: a byte changed on
    disk or in a copy would load as a silently wrong weight. This reads the file once. Files in torch's
    legacy (non-zip) format have no checksums, and a file too broken to be a zip is left to torch.load."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC == 0 and record.file_size:
                    continue  # saved with torch.serialization.config.save.compute_crc32 = False: nothing to check
                with archive.open(record) as stream:  # raises BadZipFile at the end on a CRC mismatch
                    while stream.read(1 << 24):
                        pass
    except Exception as error:  # noqa: BLE001  (BadZipFile, a broken header, ...: all mean damage)
        raise CheckpointError(
            f"checkpoint {path} is damaged: {first_line(error, 200)} (its bytes changed "
            f"after it was written: a disk, transfer or copy error). Copy it again from where it "
            f"came from, or use an earlier checkpoint{_earlier(path)}"
        ) from error


def _earlier(path: Path) -> str:
    """'; earlier checkpoints in <folder>: ...' naming the numbered checkpoints beside ``path`` (not ``path``
    itself, nor a hard link to it, which holds the same bytes), or '' if there are none."""
    others = [p.name for p in numbered_checkpoints(path.parent) if p.name != path.name and not _same_file(p, path)]
    return f"; earlier checkpoints in {path.parent}: {', '.join(others[-3:])}" if others else ""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def check_finite(state_dict: dict, source: str) -> None:
    """Refuse NaN or infinite weights: they evaluate to plausible-looking (chance-level) accuracy."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise CheckpointError(
            f"{source} holds NaN or infinite weights in {len(bad)} tensor(s), e.g. {bad[:3]}: the "
            f"run that wrote it diverged. Use an earlier checkpoint, or retrain with a lower --lr"
        )


def check_variances(state_dict: dict, source: str, fix: str) -> None:
    """Refuse negative batch-norm variances (``*running_var``): a variance is never negative, and a norm
    dividing by the square root of one gives NaN, or plausible-looking wrong accuracy at every depth."""
    bad = [
        k
        for k, v in state_dict.items()
        if k.endswith("running_var") and isinstance(v, torch.Tensor) and v.is_floating_point() and bool((v < 0).any())
    ]
    if bad:
        raise CheckpointError(
            f"{source} holds negative batch-norm variances in {len(bad)} tensor(s), e.g. {bad[:3]}: "
            f"a variance is never negative, so the file was damaged or altered. {fix}"
        )


def check_dtypes(own: dict, state_dict: dict, source: str) -> list[str]:
    """Refuse tensors that are not floating point (integer, bool, complex) where the model's are: loading
    would silently turn them into other weights (a float weight cast to int is mostly zeros; complex loses
    its imaginary part). Returns what is converted between float types, one line per pair of types, for
    the caller to say (float16 -> float32 is exact; float64 -> float32 rounds as every loader does)."""
    wrong = [k for k, v in state_dict.items() if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if wrong:
        shown = ", ".join(f"{k} ({str(state_dict[k].dtype).replace('torch.', '')})" for k in wrong[:3])
        raise CheckpointError(
            f"{source} holds {len(wrong)} tensor(s) that are not floating point where the model's "
            f"are, e.g. {shown}: loading them would make wrong weights (an integer weight is "
            f"truncated, a complex one loses its imaginary part). Give a file with the original "
            f"floating-point weights"
        )
    pairs: dict[tuple[str, str], int] = {}
    for k, v in state_dict.items():
        if k in own and own[k].is_floating_point() and v.dtype != own[k].dtype:
            pair = (str(v.dtype).replace("torch.", ""), str(own[k].dtype).replace("torch.", ""))
            pairs[pair] = pairs.get(pair, 0) + 1
    return [
        f"{count} tensor(s) converted from {a} to {b}" + (" (exact)" if a in ("float16", "bfloat16") else "")
        for (a, b), count in pairs.items()
    ]


def numbered_name(epoch: int, step: int) -> str:
    """``checkpoint-e0003-s0000150.pt``: after ``step`` steps of epoch ``epoch`` (both counted from 1)."""
    return f"checkpoint-e{epoch:04d}-s{step:07d}.pt"


def numbered_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The numbered checkpoints in ``folder``, oldest first."""
    found = [
        (tuple(map(int, m.groups())), p)
        for p in Path(folder).glob("checkpoint-e*-s*.pt")
        if (m := NUMBERED.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def load_weights_only(path: str | os.PathLike, what: str, fix: str) -> object:
    """``torch.load`` of a file written by someone else, weights only: tensors, numbers, strings and
    containers, plus ``argparse.Namespace`` (timm's, torchvision's and the paper's authors' training scripts
    store their arguments as one: a plain attribute bag whose values go through the same restricted
    unpickler). ``what`` names the file in errors (e.g. "--init-from w.pth"); ``fix`` says how to turn a
    trusted file with other objects into a state dict."""
    import argparse
    import pickle

    check_integrity(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # a zip (torch.save) or a pickle (older torch)
        raise CheckpointError(
            f"{what} is not a torch file: it starts with neither a zip header (torch.save) nor a "
            f"pickle ({'it is empty' if not head else f'its first bytes are {head!r}'}). Give a "
            f"file written by torch.save"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # a broken pickle stream, not a forbidden object
            raise CheckpointError(
                f"{what}: cannot read it: it is truncated, corrupted or not a torch file ({_unpickling_reason(error)})"
            ) from error
        raise CheckpointError(
            f"{what} holds objects other than tensors, numbers, strings and containers ({_unpickling_reason(error)}). adn "
            f"reads weights only, so that opening a file cannot run code hidden in it. If you trust the file, {fix}"
        ) from error
    except Exception as error:  # noqa: BLE001  (a truncated or non-torch file: torch raises many kinds)
        raise CheckpointError(
            f"{what}: cannot read it: it is truncated, corrupted or not a torch file "
            f"({type(error).__name__}: {first_line(error)})"
        ) from error


def _unpickling_reason(error: BaseException) -> str:
    """The line of torch's long weights-only message that says what failed ("Unsupported operand 84")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [
        line
        for line in lines
        if not line.startswith(
            ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch")
        )
    ]
    return (useful[-1] if useful else first_line(error))[:200]


def is_state_dict(data) -> bool:
    """A non-empty mapping of parameter names to tensors."""
    return (
        isinstance(data, dict)
        and bool(data)
        and all(isinstance(k, str) for k in data)
        and all(isinstance(v, torch.Tensor) for v in data.values())
    )

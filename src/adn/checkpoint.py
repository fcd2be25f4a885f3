"""Checkpoints: written atomically, loaded without executing pickled code.

A checkpoint is one ``torch.save`` file of plain containers and tensors, read back with
``torch.load(weights_only=True)`` after checking the CRC-32 of each of its records (which torch.load does
not check, so a flipped byte would otherwise load as a wrong weight):

    {"format": "adn-checkpoint", "version": 1,
     "meta": {"model": "resnet20", "num_classes": 10, "in_channels": 1, "skip_aware_norm": True, ...},
     "model": state_dict, "optimizer": ..., "epoch": int, ...}

``adn train`` keeps ``checkpoint.pt`` (the latest) and, with ``--keep-last K``, the last K numbered
checkpoints ``checkpoint-e<epoch>-s<step>.pt`` beside it; see :func:`save_rotating`.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write
from .convert import convert
from .depth_statistics import CHECKPOINT_KEY as DEPTH_STATISTICS
from .depth_statistics import DepthStatisticsError, load_depth_statistics
from .models import SMALL_MODELS, TORCHVISION_MODELS, build_model

FORMAT = "adn-checkpoint"
LATEST = "checkpoint.pt"
NUMBERED = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model; the message says which."""


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`adn.atomic.atomic_write`: a crash leaves either the old file or
    the new one, never a truncated one. A failed write (a full disk: torch says "unexpected pos") is a
    :class:`CheckpointError` that says the previous file is intact."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as error:
        kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
        raise CheckpointError(f"could not write checkpoint {path} ({type(error).__name__}: {_first_line(error)}); "
                              f"{kept}. Is the disk full? Free space, or choose another --output-dir") from error


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (the message may be empty: a zero-byte file's error is)."""
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else "no details"


def checkpoint_payload(net: nn.Module, meta: dict, **state) -> dict:
    """What a checkpoint file holds: format marker, metadata, weights, and ``state`` (optimizer, ...)."""
    return {"format": FORMAT, "version": 1, "meta": meta, "model": net.state_dict(), **state}


def save_checkpoint(path, net: nn.Module, meta: dict, **state) -> None:
    atomic_save(checkpoint_payload(net, meta, **state), path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        hint = f"; it holds {path / LATEST}" if (path / LATEST).is_file() else ""
        raise CheckpointError(f"checkpoint {path} is a folder, not a file: give the checkpoint file itself, e.g. "
                              f"{path / LATEST}{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (adn train writes <output-dir>/checkpoint.pt)"
                              f"{_earlier(path) if path.parent.is_dir() else ''}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its writer was stopped before writing anything, "
                              f"or a copy failed{_earlier(path)}")
    check_integrity(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, corrupted, or a pickle that needs code execution
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupted or not an adn checkpoint "
                              f"({type(error).__name__}: {_first_line(error)}){_earlier(path)}") from error
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
        raise CheckpointError(f"checkpoint {path} is damaged: {_first_line(error)} (its bytes changed "
                              f"after it was written: a disk, transfer or copy error). Copy it again from where it "
                              f"came from, or use an earlier checkpoint{_earlier(path)}") from error


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


# ----- the metadata of a classification checkpoint: untrusted input ---------------------------------------------
# A checkpoint's ``meta`` decides what is built and read, so it is checked like user input: the keys adn reads,
# each with its type and range, and model keyword arguments limited to those adn itself writes. (Keyword
# arguments such as timm's checkpoint_path or torchvision's weights made loading a checkpoint open another
# file or start a download; a huge width exhausted memory; keys nothing reads are ignored.)
MODEL_KWARGS = {"width": (1, 1024), "image_size": (1, 8192)}
TRAINING_METHODS = ("adn", "joint", "individual")
_TIMM_NAME = re.compile(r"^timm/[A-Za-z0-9_.\-]{1,100}$")


def validate_meta(meta, source: str = "checkpoint") -> dict:
    """Raise :class:`CheckpointError` unless ``meta`` is the metadata of an adn classification checkpoint."""
    def bad(key: str, expected: str, value=None):
        if value is None:
            value = meta.get(key) if isinstance(meta, dict) else meta
        raise CheckpointError(f"{source} has invalid metadata: {key} = {_short(value)}, expected {expected}; it was not "
                              f"written by adn train or was altered. Use a checkpoint written by adn train")
    if not isinstance(meta, dict):
        bad("meta", "a dict")
    model = meta.get("model")
    if not isinstance(model, str) or not (model in SMALL_MODELS or model in TORCHVISION_MODELS or _TIMM_NAME.match(model)):
        bad("model", "the name of a model adn builds")
    for key, low, high in (("num_classes", 1, 1_000_000), ("in_channels", 1, 64)):
        if not _int_in(meta.get(key), low, high):
            bad(key, f"an integer in [{low}, {high}]")
    kwargs = meta.get("model_kwargs", {})
    if not isinstance(kwargs, dict) or set(kwargs) - set(MODEL_KWARGS):
        bad("model_kwargs", f"a dict with keys among {sorted(MODEL_KWARGS)}")
    for key, (low, high) in MODEL_KWARGS.items():
        if key in kwargs and not _int_in(kwargs[key], low, high):
            bad(f"model_kwargs.{key}", f"an integer in [{low}, {high}]", kwargs[key])
    _check_optional_fields(meta, bad)
    return meta


def _check_optional_fields(meta: dict, bad) -> None:
    from .data import DATASETS
    checks = {
        "skip_aware_norm": (lambda v: isinstance(v, bool), "true or false"),
        "image_size": (lambda v: v is None or _int_in(v, 1, 8192), "an integer in [1, 8192] or null"),
        "method": (lambda v: v is None or v in TRAINING_METHODS, f"one of {', '.join(TRAINING_METHODS)}"),
        "trained_skip": (lambda v: v is None or (isinstance(v, str) and len(v) <= 64), "a skip string or null"),
        "dataset": (lambda v: v is None or v in DATASETS, f"one of {', '.join(DATASETS)}"),
        "data_path": (lambda v: v is None or (isinstance(v, str) and 0 < len(v) < 4096 and "\0" not in v),
                      "a path or null"),
        "mean": (lambda v: _floats(v, meta.get("in_channels")), "one number per input channel"),
        "std": (lambda v: _floats(v, meta.get("in_channels")) and all(x > 0 for x in v),
                "one positive number per input channel"),
        "config": (lambda v: isinstance(v, dict), "a dict"),
    }
    for key, (ok, expected) in checks.items():
        if key in meta and not ok(meta[key]):
            bad(key, expected)
    config = meta.get("config", {})
    if "seed" in config and not _int_in(config["seed"], 0, 2 ** 63 - 1):
        bad("config.seed", "a non-negative integer", config["seed"])
    for key in ("train_crop_size", "val_resize_size"):
        if config.get(key) is not None and not _int_in(config[key], 1, 8192):
            bad(f"config.{key}", "an integer in [1, 8192] or null", config[key])


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _floats(value, count) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == count
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def build_network(meta: dict) -> nn.Module:
    """The (untrained) adaptive depth network a checkpoint's metadata describes."""
    model = build_model(meta["model"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                        **meta.get("model_kwargs", {}))
    return convert(model, skip_aware_norm=meta.get("skip_aware_norm", True))


def load_weights(net: nn.Module, state_dict: dict, source: str = "checkpoint", check_only: bool = False) -> None:
    """Load a state_dict, naming the mismatch (architecture, class count, skip-aware norms) if any.
    ``check_only``: only compare names and shapes (``net`` may live on the meta device)."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{source} does not hold a state dict of tensors; it was not written by adn train or "
                              f"was altered")
    own = net.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape_diffs = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shape_diffs:
        problems = []
        if any(".twin." in k for k in missing) and not any(".twin." not in k for k in missing):
            problems.append("the model has skip-aware norm twins the checkpoint lacks (trained with --no-skip-aware-norm?)")
        elif missing:
            problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        for key in shape_diffs[:3]:
            problems.append(f"{key}: model {tuple(own[key].shape)} vs checkpoint {tuple(state_dict[key].shape)}"
                            + (" (different number of classes)" if key.endswith(("fc.weight", "fc.bias")) else ""))
        raise CheckpointError(f"{source} does not fit {type(net).__name__}: " + "; ".join(problems))
    if not check_only:
        net.load_state_dict(state_dict)


def load_network(path: str | os.PathLike, map_location="cpu", depth_statistics: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the network a checkpoint holds and load its weights, and its per-depth batch-norm
    statistics unless ``depth_statistics=False`` (``adn recalibrate`` replaces them: damaged ones must
    not stop it). Returns ``(net, checkpoint)``."""
    data = load_checkpoint(path, map_location)
    meta = validate_meta(data["meta"], source=str(path))
    if not isinstance(data["model"], dict):
        raise CheckpointError(f"{path} has no weights (its 'model' entry is not a state dict); it was not written by "
                              f"adn train or was altered")
    # First a skeleton without memory (the "meta" device): weights that do not fit the architecture the
    # metadata names are refused before anything of that size is allocated.
    with torch.device("meta"):
        skeleton = build_network(meta)
    load_weights(skeleton, data["model"], source=str(path), check_only=True)
    net = build_network(meta)
    load_weights(net, data["model"], source=str(path))
    check_finite(data["model"], str(path))
    if depth_statistics and data.get(DEPTH_STATISTICS) is not None:
        try:
            load_depth_statistics(net, data[DEPTH_STATISTICS], source=str(path))
        except DepthStatisticsError as error:
            raise CheckpointError(str(error)) from error
    return net, data


def load(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """``adn.load(path)``: the adaptive depth network an ``adn`` checkpoint holds (written by
    ``adn train``), with its weights, in eval mode at the super-net depth. Loading runs no pickled code,
    refuses damaged files and non-finite weights, and rebuilds the model only from the names and sizes
    adn itself writes; per-depth batch-norm statistics (``adn recalibrate``) come with it.
    ``load_network`` also returns the checkpoint's other contents."""
    net, _ = load_network(path, map_location)
    return net.eval()


def check_finite(state_dict: dict, source: str) -> None:
    """Refuse NaN or infinite weights: they evaluate to plausible-looking (chance-level) accuracy."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise CheckpointError(f"{source} holds NaN or infinite weights in {len(bad)} tensor(s), e.g. {bad[:3]}: the "
                              f"run that wrote it diverged. Use an earlier checkpoint, or retrain with a lower --lr")


# ----- the checkpoints of a run: latest + the last K numbered ones ------------------------------------------
def numbered_name(epoch: int, step: int) -> str:
    """``checkpoint-e0003-s0000150.pt``: after ``step`` steps of epoch ``epoch`` (both counted from 1)."""
    return f"checkpoint-e{epoch:04d}-s{step:07d}.pt"


def numbered_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The numbered checkpoints in ``folder``, oldest first."""
    found = [(tuple(map(int, m.groups())), p) for p in Path(folder).glob("checkpoint-e*-s*.pt")
             if (m := NUMBERED.match(p.name))]
    return [p for _, p in sorted(found)]


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
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        name = path.name[1:]
        if name.startswith(("checkpoint", "log.jsonl")):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def load_weights_only(path: str | os.PathLike, what: str, fix: str) -> object:
    """``torch.load`` of a file written by someone else, weights only: tensors, numbers, strings and
    containers, plus ``argparse.Namespace`` (timm's, torchvision's and the paper's authors' training scripts
    store their arguments as one: a plain attribute bag whose values go through the same restricted
    unpickler). ``what`` names the file in errors (e.g. "--init-from w.pth"); ``fix`` says how to turn a
    trusted file with other objects into a state dict."""
    import argparse
    import pickle

    check_integrity(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{what} holds objects other than tensors, numbers, strings and containers ({first_line(error)}). adn "
            f"reads weights only, so that opening a file cannot run code hidden in it. If you trust the file, {fix}"
        ) from error
    except Exception as error:  # noqa: BLE001  (a truncated or non-torch file: torch raises many kinds)
        raise CheckpointError(f"{what}: cannot read it: it is truncated, corrupted or not a torch file "
                              f"({type(error).__name__}: {first_line(error)})") from error


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (torch's messages run to pages)."""
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def is_state_dict(data) -> bool:
    """A non-empty mapping of parameter names to tensors."""
    return (isinstance(data, dict) and bool(data) and all(isinstance(k, str) for k in data)
            and all(isinstance(v, torch.Tensor) for v in data.values()))

"""Classification checkpoints -> networks: check a checkpoint's metadata like user input, build the
adaptive depth network it describes, and load its weights and per-depth statistics (``adn.load``).
The file itself is read by :mod:`adn.utils.checkpoint_file`."""

from __future__ import annotations

import math
import os
import re

import torch
from torch import nn

from ..convert import convert
from ..core.depth_statistics import CHECKPOINT_KEY as DEPTH_STATISTICS
from ..core.depth_statistics import DepthStatisticsError, load_depth_statistics
from ..errors import CheckpointError
from ..models import SMALL_MODELS, TORCHVISION_MODELS, build_model
from ..utils.checkpoint_file import check_finite, load_checkpoint
from .data import DATASETS

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
        raise CheckpointError(
            f"{source} has invalid metadata: {key} = {_short(value)}, expected {expected}; it was not "
            f"written by adn train or was altered. Use a checkpoint written by adn train"
        )

    if not isinstance(meta, dict):
        bad("meta", "a dict")
    task = meta.get("task")
    if task == "causal-lm":
        raise CheckpointError(
            f"{source} is a language model's checkpoint (written by adn train-lm), not an image "
            f"classifier's: use it with adn eval-lm --checkpoint {source} or adn generate "
            f"--checkpoint {source}"
        )
    if task == "detection":
        raise CheckpointError(
            f"{source} is a detector's checkpoint (written by adn detect train), not an image "
            f"classifier's: use it with adn detect eval --checkpoint {source}"
        )
    model = meta.get("model")
    if not isinstance(model, str) or not (
        model in SMALL_MODELS or model in TORCHVISION_MODELS or _TIMM_NAME.match(model)
    ):
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
    checks = {
        "skip_aware_norm": (lambda v: isinstance(v, bool), "true or false"),
        "image_size": (lambda v: v is None or _int_in(v, 1, 8192), "an integer in [1, 8192] or null"),
        "method": (lambda v: v is None or v in TRAINING_METHODS, f"one of {', '.join(TRAINING_METHODS)}"),
        "trained_skip": (lambda v: v is None or (isinstance(v, str) and len(v) <= 64), "a skip string or null"),
        "dataset": (lambda v: v is None or v in DATASETS, f"one of {', '.join(DATASETS)}"),
        "data_path": (
            lambda v: v is None or (isinstance(v, str) and 0 < len(v) < 4096 and "\0" not in v),
            "a path or null",
        ),
        "mean": (lambda v: _floats(v, meta.get("in_channels")), "one number per input channel"),
        "std": (
            lambda v: _floats(v, meta.get("in_channels")) and all(x > 0 for x in v),
            "one positive number per input channel",
        ),
        "config": (lambda v: isinstance(v, dict), "a dict"),
    }
    for key, (ok, expected) in checks.items():
        if key in meta and not ok(meta[key]):
            bad(key, expected)
    config = meta.get("config", {})
    if "seed" in config and not _int_in(config["seed"], 0, 2**63 - 1):
        bad("config.seed", "a non-negative integer", config["seed"])
    for key in ("train_crop_size", "val_resize_size"):
        if config.get(key) is not None and not _int_in(config[key], 1, 8192):
            bad(f"config.{key}", "an integer in [1, 8192] or null", config[key])


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _floats(value, count) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == count
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def build_network(meta: dict) -> nn.Module:
    """The (untrained) adaptive depth network a checkpoint's metadata describes."""
    model = build_model(
        meta["model"], num_classes=meta["num_classes"], in_channels=meta["in_channels"], **meta.get("model_kwargs", {})
    )
    return convert(model, skip_aware_norm=meta.get("skip_aware_norm", True))


def load_weights(net: nn.Module, state_dict: dict, source: str = "checkpoint", check_only: bool = False) -> None:
    """Load a state_dict, naming the mismatch (architecture, class count, skip-aware norms) if any.
    ``check_only``: only compare names and shapes (``net`` may live on the meta device)."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(
            f"{source} does not hold a state dict of tensors; it was not written by adn train or was altered"
        )
    own = net.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape_diffs = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shape_diffs:
        problems = []
        if any(".twin." in k for k in missing) and not any(".twin." not in k for k in missing):
            problems.append(
                "the model has skip-aware norm twins the checkpoint lacks (trained with --no-skip-aware-norm?)"
            )
        elif missing:
            problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        for key in shape_diffs[:3]:
            problems.append(
                f"{key}: model {tuple(own[key].shape)} vs checkpoint {tuple(state_dict[key].shape)}"
                + (" (different number of classes)" if key.endswith(("fc.weight", "fc.bias")) else "")
            )
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
        raise CheckpointError(
            f"{path} has no weights (its 'model' entry is not a state dict); it was not written by "
            f"adn train or was altered"
        )
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

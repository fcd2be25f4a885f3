"""Detector checkpoints: adn's checkpoint format (atomic, loaded with ``weights_only=True``) with
metadata that rebuilds the detector without its starting weights: the architecture, the classes and
how the backbone was set up (frozen norms, twins, FPN width, the detector's own settings)."""

from __future__ import annotations

import os

from torch import nn

from ..errors import CheckpointError
from ..utils.checkpoint_file import load_checkpoint
from ..vision.checkpoint import load_weights
from .backbone import build_detector

TASK = "detection"


def detector_meta(detector: nn.Module, categories: list[dict], detector_kwargs: dict, **extra) -> dict:
    info = detector.adn_info
    return {
        "task": TASK,
        "model": info["detector"],
        "num_classes": len(categories) + 1,
        "categories": [{"id": c["id"], "name": c["name"]} for c in categories],
        "skip_aware_norm": info["skip_aware_norm"],
        "frozen_bn": info["frozen_bn"],
        "trainable_layers": info["trainable_layers"],
        "fpn_channels": info["fpn_channels"],
        "detector_kwargs": dict(detector_kwargs),
        **extra,
    }


def build_from_meta(meta: dict) -> nn.Module:
    """The (untrained) detector a checkpoint's metadata describes."""
    return build_detector(
        meta["model"],
        meta["num_classes"],
        frozen_bn=meta["frozen_bn"],
        trainable_layers=meta["trainable_layers"],
        skip_aware_norm=meta["skip_aware_norm"],
        fpn_channels=meta["fpn_channels"],
        **meta.get("detector_kwargs", {}),
    )


def load_detector(path: str | os.PathLike, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the detector of an ``adn detect train`` checkpoint and load its weights."""
    data = load_checkpoint(path, map_location)
    if data["meta"].get("task") != TASK:
        raise CheckpointError(
            f"{path} is a classifier checkpoint (adn train); `adn detect` needs one written by "
            f"`adn detect train`. To start a detector from it: adn detect train "
            f"--backbone-weights {path}"
        )
    detector = build_from_meta(data["meta"])
    load_weights(detector, data["model"], source=str(path))
    return detector, data

"""Checkpoints: written atomically, loaded without executing pickled code.

A checkpoint is one ``torch.save`` file of plain containers and tensors, read back with
``torch.load(weights_only=True)``:

    {"format": "adn-checkpoint", "version": 1,
     "meta": {"model": "resnet20", "num_classes": 10, "in_channels": 1, "skip_aware_norm": True, ...},
     "model": state_dict, "optimizer": ..., "lr_scheduler": ..., "epoch": int}
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write
from .convert import convert
from .models import build_model

FORMAT = "adn-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model; the message says which."""


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`adn.atomic.atomic_write`: a crash leaves either the old file or
    the new one, never a truncated one."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(path, net: nn.Module, meta: dict, **state) -> None:
    atomic_save({"format": FORMAT, "version": 1, "meta": meta, "model": net.state_dict(), **state}, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (adn train writes <output-dir>/checkpoint.pt)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, corrupted, or a pickle that needs code execution
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupted or not an adn checkpoint "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data or "meta" not in data:
        raise CheckpointError(f"{path} is not an adn checkpoint (expected a file written by adn train)")
    return data


def build_network(meta: dict) -> nn.Module:
    """The (untrained) adaptive depth network a checkpoint's metadata describes."""
    model = build_model(meta["model"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                        **meta.get("model_kwargs", {}))
    return convert(model, skip_aware_norm=meta.get("skip_aware_norm", True))


def load_weights(net: nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Load a state_dict, naming the mismatch (architecture, class count, skip-aware norms) if any."""
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
    net.load_state_dict(state_dict)


def load_network(path: str | os.PathLike, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network a checkpoint holds and load its weights. Returns ``(net, checkpoint)``."""
    data = load_checkpoint(path, map_location)
    net = build_network(data["meta"])
    load_weights(net, data["model"], source=str(path))
    return net, data

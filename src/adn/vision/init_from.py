"""``adn train --init-from FILE``: start training from the weights of another network.

The file may hold a plain (unconverted) network — a torchvision-style ``.pth`` state dict, a safetensors
file, a timm checkpoint (``{"state_dict": ...}``, ``{"model": ...}`` or a plain state dict) — or be an
``adn`` checkpoint. The weights go into the run's converted network as if it had been converted after
loading: every skip-aware twin starts as a copy of its norm. Two kinds of ``adn`` checkpoint differ:

- of ``--method individual``: one sub-network was trained, so each norm and its twin both start from the
  one that sub-network used (the norm where its stage ran, the twin where it skipped);
- of ``--method adn`` / ``joint``: the twins were trained too and are loaded as they are.

A classification head whose class count differs from the data set's (the last ``nn.Linear`` of the
model) keeps its fresh initialization and is reported. Files are read without unpickling code
(``torch.load(weights_only=True)`` or safetensors); a file that does not fit the model is refused with
its first mismatched keys and shapes.

:func:`scale_body_lr` gives the pretrained body a lower learning rate than the head (``--body-lr-scale``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..utils.checkpoint_file import (
    FORMAT,
    check_dtypes,
    check_finite,
    check_variances,
    is_state_dict,
    load_weights_only,
)
from ..errors import CheckpointError, first_line
from .checkpoint import validate_meta
from ..core.layers import SkipAwareNorm
from ..core.skip import SkipConfig

TWIN = ".twin."
ENTRIES = ("state_dict", "model")  # where timm's and torchvision's training scripts keep the weights


@dataclass
class InitWeights:
    """The state dict a file holds, what kind of file it was, and its adn metadata (adn checkpoints only)."""

    state_dict: dict
    kind: str
    meta: dict | None = None


# ----- reading ------------------------------------------------------------------------------------------------
def read_init_file(path: str | os.PathLike) -> InitWeights:
    """The weights in ``path``, read without running any code from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"--init-from {path}: no such file; give a .pth/.pt state dict, a .safetensors file, "
            f"a timm checkpoint or an adn checkpoint"
        )
    if _is_safetensors(path):
        return InitWeights(_read_safetensors(path), "safetensors file")
    data = _torch_load(path)
    if not isinstance(data, dict):
        raise CheckpointError(
            f"--init-from {path} holds a {type(data).__name__}, not a state dict; expected a dict of "
            f"tensors (torch.save(model.state_dict(), path)) or a checkpoint that holds one"
        )
    if data.get("format") == FORMAT:
        meta = validate_meta(data.get("meta"), source=str(path))
        method = meta.get("method") or "adn"
        trained = f" --skip {meta['trained_skip']}" if method == "individual" else ""
        return InitWeights(
            _tensors(data.get("model"), path, "its 'model' entry"), f"adn checkpoint (--method {method}{trained})", meta
        )
    if is_state_dict(data):
        return InitWeights(_strip_module_prefix(data), "state dict")
    for entry in ENTRIES:
        if entry in data:
            return InitWeights(
                _strip_module_prefix(_tensors(data[entry], path, f"its {entry!r} entry")),
                f"checkpoint ({entry!r} entry)",
            )
    found = ", ".join(map(repr, list(data)[:8])) or "nothing"
    raise CheckpointError(
        f"--init-from {path}: found no weights in it (it holds {found}); expected a state dict, or a "
        f"checkpoint with a 'state_dict' or 'model' entry"
    )


def _is_safetensors(path: Path) -> bool:
    """By name, or by content: 8 bytes of header length, then the JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return _strip_module_prefix(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"--init-from {path}: not a readable safetensors file ({first_line(error)})") from error


def _torch_load(path: Path):
    return load_weights_only(
        path,
        f"--init-from {path}",
        "save its state dict alone with the code that wrote it "
        "(torch.save(model.state_dict(), 'weights.pth')) and start from that",
    )


def _tensors(value, path: Path, where: str) -> dict:
    if not isinstance(value, dict) or not is_state_dict(value):
        raise CheckpointError(f"--init-from {path}: {where} is not a dict of tensors; expected a state dict")
    return value


def _strip_module_prefix(state_dict: dict) -> dict:
    """DataParallel, DistributedDataParallel and EMA wrappers prefix every key with ``module.``."""
    state_dict = {k: v for k, v in state_dict.items() if k != "n_averaged"}
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


# ----- fitting the file to the run's network -----------------------------------------------------------------------
def head_module(net: nn.Module) -> tuple[str, nn.Linear]:
    """The classification head: the last ``nn.Linear`` registered (``fc``, ``classifier.1``, ``heads.head``,
    ``head``, timm's ``head.fc``)."""
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__} has no nn.Linear classification head")
    return linears[-1]


def used_norms_of_individual(net: nn.Module, state_dict: dict, trained_skip: str) -> dict:
    """An individual run trained one sub-network: for each skip-aware norm, the one it used (its twin where
    its stage skipped) becomes the norm, and the twins are dropped (they start as copies of it)."""
    config = SkipConfig(trained_skip, net.num_stages)
    if any(config) and any(TWIN in k for k in state_dict) and not any(stage.norms for stage in net.adn_stages):
        raise CheckpointError(
            f"the file's network was trained at depth {config}, with the twins of skip-aware norms; "
            f"this run has none (--no-skip-aware-norm): drop that flag to start from it"
        )
    names = {module: name for name, module in net.named_modules()}
    from_twin = {names[norm] for stage, skipped in zip(net.adn_stages, config) if skipped for norm in stage.norms}
    plain = {k: v for k, v in state_dict.items() if TWIN not in k}
    for key, value in state_dict.items():
        if TWIN in key:
            norm, parameter = key.split(TWIN, 1)
            if norm in from_twin:
                plain[f"{norm}.{parameter}"] = value
    return plain


def fit_report(net: nn.Module, state_dict: dict, source: str, model: str) -> tuple[dict, str | None]:
    """``state_dict`` as it loads into ``net`` (its head left out if its class count differs), and the
    name of the replaced head (or None). Raises :class:`CheckpointError` naming the first mismatched
    keys and shapes when the file does not fit."""
    own = net.state_dict()
    with_twins = any(TWIN in k for k in state_dict)
    expected = {k for k in own if with_twins or TWIN not in k}
    head_name, head = head_module(net)
    head_keys = {f"{head_name}.{p}" for p, _ in head.named_parameters(recurse=False)}
    replaced = None
    if head_keys <= set(state_dict) and any(state_dict[k].shape != own[k].shape for k in head_keys):
        file_classes = state_dict[f"{head_name}.weight"].shape[0]
        if state_dict[f"{head_name}.weight"].shape[1:] == own[f"{head_name}.weight"].shape[1:]:
            state_dict = {k: v for k, v in state_dict.items() if k not in head_keys}
            expected -= head_keys
            replaced = f"{head_name} ({file_classes} classes in the file, {head.out_features} in the data set)"
    missing = [k for k in own if k in expected and k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            problems.append(
                f"{len(shapes)} key(s) of another shape, first "
                + ", ".join(f"{k}: model {tuple(own[k].shape)}, file {tuple(state_dict[k].shape)}" for k in shapes[:3])
            )
        if missing:
            problems.append(f"{len(missing)} key(s) of the model missing from the file, first {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} key(s) of the file the model lacks, first {unexpected[:3]}")
        twin_hint = (
            " The file has skip-aware twins and this run has none: drop --no-skip-aware-norm."
            if with_twins and not any(TWIN in k for k in own)
            else ""
        )
        raise CheckpointError(
            f"--init-from {source} does not fit --model {model} as built for this data set: "
            + "; ".join(problems)
            + f".{twin_hint} Give the --model (and --width) the file was trained with and a data set with the same "
            f"number of image channels; only a classification head with another class count is replaced"
        )
    return state_dict, replaced


def init_from(net: nn.Module, path: str | os.PathLike, model: str, log: Callable[[str], None] = print) -> dict:
    """Load the weights of ``path`` into the converted network ``net`` (see the module's docstring), in
    place. Returns what happened: ``{"kind", "tensors", "replaced_head", "twins"}``; ``log`` says it."""
    weights = read_init_file(path)
    state_dict = weights.state_dict
    if weights.meta is not None:
        if weights.meta["model"] != model:
            raise CheckpointError(
                f"--init-from {path} is an adn checkpoint of --model {weights.meta['model']}; this "
                f"run has --model {model}: use the same model"
            )
        if weights.meta.get("method") == "individual" and weights.meta.get("trained_skip"):
            state_dict = used_norms_of_individual(net, state_dict, weights.meta["trained_skip"])
    state_dict, replaced = fit_report(net, state_dict, str(path), model)
    conversions = check_dtypes(net.state_dict(), state_dict, f"--init-from {path}")
    check_finite(state_dict, f"--init-from {path}")
    check_variances(state_dict, f"--init-from {path}", "Start from the original file, or from another one")
    net.load_state_dict(state_dict, strict=False)  # (fit_report checked that only the twins or the head are left)
    twins_loaded = any(TWIN in k for k in state_dict)
    if not twins_loaded:  # as if converted after loading: each twin a copy of its (loaded) norm
        for module in net.modules():
            if isinstance(module, SkipAwareNorm):
                module.sync_twin()
    twins = "loaded from the file" if twins_loaded else "copies of their norms"
    log(f"initialized from {path} ({weights.kind}): {len(state_dict)} tensors; skip-aware twins: {twins}")
    for conversion in conversions:
        log(f"--init-from {path}: {conversion}, the model's type")
    if replaced:
        log(f"replaced the classification head {replaced}: it starts from a fresh initialization")
    return {"kind": weights.kind, "tensors": len(state_dict), "replaced_head": replaced, "twins": twins}


# ----- a lower learning rate for the pretrained body ---------------------------------------------------------------
def scale_body_lr(groups: list[dict], net: nn.Module, lr: float, scale: float) -> list[dict]:
    """Split parameter groups so that the classification head (:func:`head_module`) trains at ``lr`` and
    everything else at ``lr * scale``. Head groups come first (the learning rate ``adn train`` logs is the
    first group's). Each group records its ``lr_scale``, so a resumed run restores it."""
    head = {id(p) for p in head_module(net)[1].parameters()}
    heads, bodies = [], []
    for group in groups:
        params = group["params"]
        in_head = [p for p in params if id(p) in head]
        in_body = [p for p in params if id(p) not in head]
        if in_head:
            heads.append({**group, "params": in_head, "lr": lr, "lr_scale": 1.0})
        if in_body:
            bodies.append({**group, "params": in_body, "lr": lr * scale, "lr_scale": scale})
    return heads + bodies

"""The ADN weights the paper's authors published, under our names.

The authors trained ResNet-50, MobileNetV2, ViT-B/16 and Swin-T on ImageNet with their own model
classes. Their files are torch pickles of tensors whose keys differ from ours in a few regular ways
(the key lists with every name and shape, and these rules, are in ``shared/authors-weights/``):

- a skip-aware norm is their sibling ``<norm>_skip`` and our child ``<norm>.twin``;
- MobileNetV2: their stages nest blocks (``features.<stage>.<block>``; a stage of one block is the
  block itself) where torchvision's list is flat, and a conv unit is ``conv_layer``/``norm`` where
  torchvision uses ``0``/``1``; the last (linear) unit of a block is flat in torchvision;
- Swin-T: their stem is ``pre.*`` (our ``features.0.*``), so their ``features.i`` is our ``features.(i+1)``;
- ResNet-50 and ViT-B/16: only the skip norms differ.

``import_authors_weights(path, "resnet50", output="resnet50-adn.pt")`` returns our converted network with
their weights and, with ``output``, writes an ``adn`` checkpoint that every command reads. Files are read
with ``torch.load(weights_only=True)``: no code in them runs.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from torch import nn

from ..convert import convert
from ..errors import CheckpointError
from ..models import build_model
from ..utils.checkpoint_file import (
    atomic_save,
    check_dtypes,
    check_finite,
    check_variances,
    checkpoint_payload,
    is_state_dict,
    load_weights_only,
)
from .data import IMAGENET_MEAN, IMAGENET_STD

ARCHITECTURES = ("resnet50", "mobilenet_v2", "vit_b_16", "swin_t")
ENTRIES = ("model", "model_ema")  # the state dicts a training file of theirs may hold
IMAGE_SIZE = 224
NUM_CLASSES = 1000
# MobileNetV2 (torchvision's inverted-residual setting): blocks per stage. Their features.1..7 are these stages.
MOBILENET_STAGE_BLOCKS = (1, 2, 3, 4, 3, 3, 1)
SKIP_SUFFIX = "_skip"


# ----- renaming: one key of theirs -> our key ------------------------------------------------------------------
def rename_key(key: str, model: str) -> str:
    """Our name for the authors' ``key`` of architecture ``model``. A key no rule knows comes back
    unchanged, so that loading reports it as unexpected (by name) instead of guessing."""
    if model not in ARCHITECTURES:
        raise ValueError(f"no renaming rules for {model!r}; the authors published {', '.join(ARCHITECTURES)}")
    parts = key.split(".")
    skip = [i for i, part in enumerate(parts[:-1]) if part.endswith(SKIP_SUFFIX)]
    if skip:  # rename the norm itself, then hang the twin under it: <norm>_skip.<param> -> <norm>.twin.<param>
        parts[skip[0]] = parts[skip[0]][: -len(SKIP_SUFFIX)]
    renamed = _STRUCTURE[model](".".join(parts))
    if skip:
        head, param = renamed.rsplit(".", 1)
        renamed = f"{head}.twin.{param}"
    return renamed


def _same(key: str) -> str:
    return key


def _swin(key: str) -> str:
    """Their stem ``pre.*`` is our ``features.0``; every later ``features.i`` moves up by one."""
    if key.startswith("pre."):
        return "features.0." + key[len("pre.") :]
    match = re.match(r"features\.(\d+)\.(.*)$", key)
    return f"features.{int(match[1]) + 1}.{match[2]}" if match else key


def _mobilenet(key: str) -> str:
    match = re.match(r"features\.(\d+)\.(.*)$", key)
    if not match:
        return key  # classifier.*: same name
    index, rest = int(match[1]), match[2]
    last = len(MOBILENET_STAGE_BLOCKS) + 1
    if index in (0, last):  # the first and last conv units (features.0, features.8 -> features.18)
        flat = 0 if index == 0 else sum(MOBILENET_STAGE_BLOCKS) + 1
        return f"features.{flat}.{_conv_unit(rest)}"
    if not 1 <= index < last:
        return key
    start = 1 + sum(MOBILENET_STAGE_BLOCKS[: index - 1])  # flat index of the stage's first block
    if MOBILENET_STAGE_BLOCKS[index - 1] > 1:  # nested: features.<stage>.<block>.conv...
        nested = re.match(r"(\d+)\.(.*)$", rest)
        if not nested:
            return key
        start, rest = start + int(nested[1]), nested[2]
    return f"features.{start}.{_block(rest, expands=start != 1)}"


def _conv_unit(rest: str) -> str:
    """``conv_layer.*`` -> ``0.*`` and ``norm.*`` -> ``1.*`` (torchvision's Conv2dNormActivation)."""
    head, _, tail = rest.partition(".")
    return {"conv_layer": "0", "norm": "1"}.get(head, head) + "." + tail


def _block(rest: str, expands: bool) -> str:
    """Inside an inverted residual block: ``conv.<j>.<unit>``. The last unit (the linear projection,
    j = 2, or j = 1 in the one block without expansion) is two flat entries in torchvision, conv ``j``
    and norm ``j + 1``; the others are Conv2dNormActivation units ``j.0`` / ``j.1``."""
    match = re.match(r"conv\.(\d+)\.(conv_layer|norm)\.(.*)$", rest)
    if not match:
        return rest
    unit, layer, tail = int(match[1]), match[2], match[3]
    if unit == (2 if expands else 1):
        return f"conv.{unit + (layer == 'norm')}.{tail}"
    return f"conv.{unit}.{'0' if layer == 'conv_layer' else '1'}.{tail}"


_STRUCTURE = {"resnet50": _same, "vit_b_16": _same, "mobilenet_v2": _mobilenet, "swin_t": _swin}


def rename_state_dict(state_dict: dict, model: str) -> dict:
    """The authors' state dict under our names. Two keys landing on one name is an error (it would
    silently drop one tensor)."""
    renamed = {}
    for key, value in state_dict.items():
        ours = rename_key(key, model)
        if ours in renamed:
            raise CheckpointError(
                f"two of the file's keys map to {ours!r} (one of them is {key!r}); the file is not "
                f"an authors' {model} state dict. Check --model"
            )
        renamed[ours] = value
    return renamed


# ----- reading their files ----------------------------------------------------------------------------------------
def read_authors_file(source, which: str | None = None) -> tuple[dict, str]:
    """The state dict in ``source`` (a path, or what ``torch.load`` returned) and where it was found:
    ``"state dict"`` (a plain one, as published), ``"model"`` or ``"model_ema"`` (a training file;
    ``which`` picks one, default "model" when present). The EMA's ``module.`` prefix and ``n_averaged``
    counter are removed."""
    if which is not None and which not in ENTRIES:
        raise ValueError(f"which={which!r}: expected one of {', '.join(ENTRIES)}")
    data = _load_file(source) if isinstance(source, (str, os.PathLike)) else source
    name = str(source) if isinstance(source, (str, os.PathLike)) else "the given dict"
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{name} holds a {type(data).__name__}, not a state dict; expected the authors' weights "
            f"(a dict of tensors) or a training file {{'model': ..., 'model_ema': ...}}"
        )
    if is_state_dict(data):
        if which is not None:
            raise ValueError(f"{name} is a plain state dict (no 'model' or 'model_ema' entries); drop --which")
        return _clean(data), "state dict"
    present = [entry for entry in ENTRIES if entry in data]
    chosen = which or (present[0] if present else None)
    if chosen not in data:
        found = ", ".join(map(repr, list(data)[:8])) or "nothing"
        wanted = repr(chosen) if chosen else " or ".join(map(repr, ENTRIES))
        raise CheckpointError(
            f"{name} has no {wanted} entry (it holds {found}); "
            f"expected the authors' weights: a plain state dict, or a training file with 'model' "
            f"and/or 'model_ema'" + (f". Use --which {present[0]}" if present else "")
        )
    state_dict = data[chosen]
    if not isinstance(state_dict, dict) or not is_state_dict(state_dict):
        raise CheckpointError(f"{name}: its {chosen!r} entry is not a dict of tensors; expected a state dict")
    return _clean(state_dict), chosen


def _load_file(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; give the authors' .pth file")
    return load_weights_only(
        path,
        str(path),
        "save its state dict alone with the code that wrote it, e.g. "
        "torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth'), and import that",
    )


def _clean(state_dict: dict) -> dict:
    """Drop what torch's EMA wrapper (AveragedModel) adds: its ``n_averaged`` counter (not a weight) and
    the ``module.`` prefix on every key (DataParallel adds the same prefix)."""
    state_dict = {k: v for k, v in state_dict.items() if k != "n_averaged"}
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


# ----- loading into our network -----------------------------------------------------------------------------------
def build_network(model: str) -> nn.Module:
    """Our converted network for ``model`` (the authors' architectures, ImageNet's 1000 classes)."""
    if model not in ARCHITECTURES:
        raise ValueError(f"--model {model}: the authors published weights for {', '.join(ARCHITECTURES)}")
    return convert(build_model(model, num_classes=NUM_CLASSES, in_channels=3))


def check_fits(net: nn.Module, state_dict: dict, model: str, source: str) -> None:
    """Raise :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys (first few of
    each, with counts) unless ``state_dict`` holds exactly the tensors ``net`` has."""
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (after renaming to ours), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if shapes:
        problems.append(
            f"{len(shapes)} key(s) with another shape, e.g. "
            + ", ".join(f"{k}: ours {tuple(own[k].shape)}, file {tuple(state_dict[k].shape)}" for k in shapes[:3])
        )
    if missing and all(".twin." in k for k in missing) and not unexpected:
        hint = (
            f"The file has no skip norms ('_skip' keys): it is a plain {model}, not an adaptive depth network; "
            f"fine-tune it into one with adn train instead"
        )
    else:
        hint = (
            f"Expected every key of the authors' {model} ImageNet model (docs/pretrained.md lists the naming "
            f"rules). Check --model, and that the file holds the authors' ADN weights"
        )
    raise CheckpointError(f"{source} does not fit the authors' {model} layout: " + "; ".join(problems) + ". " + hint)


def authors_meta(model: str, source: str, entry: str) -> dict:
    """Checkpoint metadata in the form ``adn train`` writes, for an ImageNet network of the authors'."""
    return {
        "model": model,
        "model_kwargs": {},
        "num_classes": NUM_CLASSES,
        "in_channels": 3,
        "image_size": IMAGE_SIZE,
        "skip_aware_norm": True,
        "method": "adn",
        "trained_skip": None,
        # ImageNet as an image folder; where it lives is the user's: adn eval --data-path
        "dataset": "imagefolder",
        "data_path": None,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "config": {
            "seed": 0,
            "train_crop_size": IMAGE_SIZE,
            "val_resize_size": None,
            "imported_from": "authors",
            "source": source,
            "entry": entry,
        },
    }


def import_authors_weights(
    source,
    model: str,
    output: str | os.PathLike | None = None,
    which: str | None = None,
    output_flag: str = "output path",
) -> nn.Module:
    """Our converted ``model`` network with the authors' published weights from ``source`` (a path to
    their ``.pth`` file, or the dict ``torch.load`` returned), in eval mode. ``which``: in a training
    file, "model" (the default when present) or "model_ema". With ``output``, also write an ``adn``
    checkpoint there (atomically) that ``adn eval``, ``profile``, ``export``, ``analyze`` and
    :func:`adn.load` read (``adn import-weights`` checks the path first: :mod:`adn.utils.outputs`;
    ``output_flag`` names it in a write failure). Raises :class:`CheckpointError` naming the keys that
    do not fit."""
    net = build_network(model)  # first: an unknown --model fails before the file is read
    state_dict, entry = read_authors_file(source, which)
    label = str(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"
    renamed = rename_state_dict(state_dict, model)
    check_fits(net, renamed, model, label)
    for conversion in check_dtypes(net.state_dict(), renamed, label):
        print(f"adn: note: {label}: {conversion}, the model's type", file=sys.stderr)
    check_finite(renamed, label)
    check_variances(renamed, label, "Import the file as the authors published it (download it again)")
    net.load_state_dict(renamed, strict=True)
    if output is not None:
        source_name = Path(source).name if isinstance(source, (str, os.PathLike)) else None
        atomic_save(checkpoint_payload(net, authors_meta(model, source_name, entry)), output, output_flag)
    return net.eval()

"""Adaptive depth ResNet-FPN backbones inside torchvision's Faster R-CNN and Mask R-CNN.

Two ways in:

- :func:`build_detector` builds a detector the way torchvision's builders do (same modules, same
  parameter names; ``fasterrcnn_resnet50_fpn``, ``maskrcnn_resnet50_fpn_v2``, ``maskrcnn_resnet18_fpn``,
  ...), optionally starting from backbone weights (torchvision ImageNet weights, an ``adn train``
  checkpoint, or a ResNet state_dict file), and converts it;
- :func:`convert_detector` converts an existing torchvision detector with a ResNet-FPN backbone in
  place (one loaded with COCO weights, say).

How depth switching reaches the modules that run: torchvision's ``BackboneWithFPN`` wraps the ResNet in
an ``IntermediateLayerGetter``, a new container holding the ResNet's children (the same block objects).
The skip controllers are built on the blocks found in ``detector.backbone.body`` -- the ones the
detector actually executes -- and attached to the detector object itself, so ``detector.skip = "TTFF"``,
``detector(images, skip="base")`` and ``with detector.skipping(...)`` work exactly as on a classifier.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d

from ..utils.checkpoint_file import FORMAT as CHECKPOINT_FORMAT, check_integrity
from ..errors import CheckpointError
from ..convert import convert_stages
from ..convert.resnet import resnet_stages
from ..models import TORCHVISION_RESNETS
from ..core.network import AdaptiveDepthNetwork

KINDS = {"fasterrcnn": FasterRCNN, "maskrcnn": MaskRCNN}
DETECTOR_MODELS = tuple(
    f"{kind}_{arch}_fpn{v2}" for kind in KINDS for arch in TORCHVISION_RESNETS for v2 in ("", "_v2")
)
_NAME = re.compile(r"^(?P<kind>fasterrcnn|maskrcnn)_(?P<arch>.+)_fpn(?P<v2>_v2)?$")
DEFAULT_FPN_CHANNELS = 256  # torchvision's; smaller values shrink FPN, RPN and heads for CPU experiments


@dataclass(frozen=True)
class DetectorName:
    """``maskrcnn_resnet50_fpn_v2`` -> kind ``maskrcnn``, backbone ``resnet50``, ``v2`` True (torchvision's
    improved recipe: BatchNorm in the FPN and heads, a two-conv RPN head, a four-conv box head)."""

    kind: str
    arch: str
    v2: bool

    @property
    def has_masks(self) -> bool:
        return self.kind == "maskrcnn"

    @classmethod
    def parse(cls, name: str) -> DetectorName:
        match = _NAME.match(name)
        if match is None or match["arch"] not in TORCHVISION_RESNETS:
            raise ValueError(
                f"unknown detector {name!r}: expected <fasterrcnn|maskrcnn>_<backbone>_fpn[_v2] with a "
                f"backbone among {', '.join(TORCHVISION_RESNETS)}, e.g. maskrcnn_resnet50_fpn or "
                f"fasterrcnn_resnet18_fpn"
            )
        return cls(match["kind"], match["arch"], bool(match["v2"]))


# ----- backbone weights ------------------------------------------------------------------------------------
@dataclass
class BackboneWeights:
    """A ResNet state_dict to start the backbone from. ``adaptive``: it holds skip-aware twins (an ADN
    checkpoint), so it is loaded after conversion; a plain ResNet's weights are loaded before it, and
    the twins start as copies."""

    state: dict
    source: str
    adaptive: bool = False
    skip_aware_norm: bool = True
    meta: dict = field(default_factory=dict)


def resolve_backbone_weights(value, arch: str) -> BackboneWeights | None:
    """``value``: None; a converted or plain ResNet module; a state_dict; a path to an ``adn train``
    checkpoint or to a saved ResNet state_dict; or a torchvision weights name for ``arch``
    (``IMAGENET1K_V1``, ``DEFAULT``: downloaded by torchvision)."""
    if value is None:
        return None
    if isinstance(value, nn.Module):
        adaptive = isinstance(value, AdaptiveDepthNetwork)
        info = getattr(value, "adn_info", {})
        return BackboneWeights(
            value.state_dict(), f"{type(value).__name__} module", adaptive, info.get("skip_aware_norm", True)
        )
    if isinstance(value, dict):
        return _from_state_dict(value, "the given state_dict")
    text = str(value)
    path = Path(text).expanduser()
    if path.is_file():
        return _from_file(path, arch)
    if "/" in text or text.endswith((".pt", ".pth", ".safetensors")):
        raise ValueError(
            f"backbone weights {text}: no such file. Give an `adn train` checkpoint, a ResNet state_dict "
            f"file, or a torchvision weights name such as IMAGENET1K_V1"
        )
    try:
        weights = torchvision.models.get_model_weights(arch)[text]
    except KeyError:
        names = list(torchvision.models.get_model_weights(arch).__members__)
        raise ValueError(
            f"backbone weights {text!r}: not a file and not a torchvision weights name of {arch} ({', '.join(names)})"
        ) from None
    # Needs the internet the first time (torchvision caches the file under ~/.cache/torch).
    return BackboneWeights(weights.get_state_dict(progress=True, check_hash=True), f"torchvision {arch} {text}")


def _from_state_dict(state: dict, source: str) -> BackboneWeights:
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} is not a state_dict (a dict of parameter names to tensors)")
    adaptive = any(".twin." in key for key in state)
    return BackboneWeights(state, source, adaptive, skip_aware_norm=adaptive)


def _from_file(path: Path, arch: str) -> BackboneWeights:
    check_integrity(path)  # torch.load would load a damaged record as a wrong weight
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot read backbone weights {path} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); expected an `adn train` checkpoint or a "
            f"torch.save'd ResNet state_dict"
        ) from error
    if isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT:
        meta = data.get("meta", {})
        if meta.get("task") == "detection":
            raise CheckpointError(
                f"{path} is a detector checkpoint; to continue training it use "
                f"`adn detect train --resume {path}`, to evaluate it `adn detect eval`"
            )
        if meta.get("model") != arch:
            raise CheckpointError(
                f"{path} holds a {meta.get('model')!r} network, but this detector's backbone is "
                f"{arch}; choose the detector of that backbone (e.g. "
                f"maskrcnn_{meta.get('model')}_fpn) or another checkpoint"
            )
        if meta.get("in_channels", 3) != 3:
            raise CheckpointError(f"{path} was trained on {meta['in_channels']}-channel images; detectors take RGB")
        return BackboneWeights(
            data["model"], str(path), adaptive=True, skip_aware_norm=meta.get("skip_aware_norm", True), meta=meta
        )
    if isinstance(data, dict):
        for key in ("model", "state_dict"):  # torchvision's reference scripts nest it under "model"
            if isinstance(data.get(key), dict):
                data = data[key]
                break
        return _from_state_dict(data, str(path))
    raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state_dict or an adn checkpoint")


def load_backbone_state(body: nn.Module, weights: BackboneWeights) -> None:
    """Load ResNet weights into a detector's backbone body. The classifier head (``fc.*``) is dropped;
    ``num_batches_tracked`` is ignored (FrozenBatchNorm2d has none). Mismatches are named."""
    state = {k: v for k, v in weights.state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in body.state_dict().items() if not k.startswith("fc.")}
    counted = lambda keys: {k for k in keys if not k.endswith("num_batches_tracked")}  # noqa: E731
    missing, unexpected = sorted(counted(own) - counted(state)), sorted(counted(state) - counted(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    problems = []
    if missing and all(".twin." in k for k in missing):
        problems.append(
            "the backbone has skip-aware norm twins these weights lack (convert with "
            "skip_aware_norm=False / --no-skip-aware-norm to match them)"
        )
    elif missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
    if unexpected and all(".twin." in k for k in unexpected):
        problems.append("these weights hold skip-aware norm twins the backbone lacks (keep skip-aware norms on)")
    elif unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    problems += [f"{k}: backbone {tuple(own[k].shape)} vs weights {tuple(state[k].shape)}" for k in shapes[:3]]
    if problems:
        raise CheckpointError(f"backbone weights from {weights.source} do not fit: " + "; ".join(problems))
    body.load_state_dict(state, strict=False)


# ----- building ---------------------------------------------------------------------------------------------
def resnet_fpn(
    resnet: nn.Module, trainable_layers: int, out_channels: int = DEFAULT_FPN_CHANNELS, norm_layer=None
) -> BackboneWithFPN:
    """torchvision's ``_resnet_fpn_extractor`` (same freezing rule, same module names) with the FPN width
    as a parameter: layers outside the last ``trainable_layers`` of (layer4, layer3, layer2, layer1,
    conv1) get ``requires_grad=False``."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(
            f"trainable backbone layers must be in 0..5 (0: all frozen, 5: all trainable), got {trainable_layers}"
        )
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers] + (
        ["bn1"] if trainable_layers == 5 else []
    )
    for name, parameter in resnet.named_parameters():
        if not any(name.startswith(prefix) for prefix in train):
            parameter.requires_grad_(False)
    stage2 = resnet.inplanes // 8  # channels of layer1's output (64 x block expansion)
    return BackboneWithFPN(
        resnet,
        {f"layer{i}": str(i - 1) for i in range(1, 5)},
        [stage2 * 2**i for i in range(4)],
        out_channels,
        norm_layer=norm_layer,
    )


def _assemble(name: DetectorName, backbone: BackboneWithFPN, num_classes: int, **kwargs) -> nn.Module:
    """The heads torchvision's builders use, sized by the FPN width (at 256 they are exactly torchvision's:
    RPN head, TwoMLPHead(256*7*7, 1024) or the v2 conv head, MaskRCNNHeads(256, [256]*4))."""
    c, norm = backbone.out_channels, (nn.BatchNorm2d if name.v2 else None)
    representation = 4 * c
    heads = dict(
        rpn_head=RPNHead(c, 3, conv_depth=2 if name.v2 else 1),
        box_head=(
            FastRCNNConvFCHead((c, 7, 7), [c] * 4, [representation], norm_layer=norm)
            if name.v2
            else TwoMLPHead(c * 7 * 7, representation)
        ),
        box_predictor=FastRCNNPredictor(representation, num_classes),
    )
    if name.has_masks:
        heads.update(
            mask_head=MaskRCNNHeads(c, [c] * 4, 1, norm_layer=norm), mask_predictor=MaskRCNNPredictor(c, c, num_classes)
        )
    for key in heads:
        if key in kwargs:  # a head the caller supplies replaces ours
            heads[key] = kwargs.pop(key)
    return KINDS[name.kind](backbone, num_classes=None, **heads, **kwargs)


def build_detector(
    name: str,
    num_classes: int,
    *,
    backbone_weights=None,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
    skip_aware_norm: bool | None = None,
    fpn_channels: int = DEFAULT_FPN_CHANNELS,
    **detector_kwargs,
) -> nn.Module:
    """A torchvision detector with an adaptive depth ResNet-FPN backbone.

    Args:
        name: ``<fasterrcnn|maskrcnn>_<resnet>_fpn[_v2]``, e.g. ``maskrcnn_resnet50_fpn``.
        num_classes: object classes + 1 (torchvision counts the background as class 0).
        backbone_weights: where the backbone starts (see :func:`resolve_backbone_weights`); None: random.
        trainable_layers: as torchvision's ``trainable_backbone_layers``; default 3 with weights, else 5.
        frozen_bn: FrozenBatchNorm2d in the backbone (twins included); default as torchvision: with
            weights for the v1 recipe, never for v2.
        skip_aware_norm: twins for the shared blocks' norms; default: as the ADN checkpoint was trained,
            else True.
        fpn_channels: FPN width (256 = torchvision); smaller widths also shrink RPN and heads.
        detector_kwargs: passed to ``FasterRCNN``/``MaskRCNN`` (``min_size``, ``box_batch_size_per_image``...).
    """
    spec = DetectorName.parse(name)
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too, so it must be at least 2, got {num_classes}")
    weights = resolve_backbone_weights(backbone_weights, spec.arch)
    pretrained = weights is not None
    frozen_bn = (pretrained and not spec.v2) if frozen_bn is None else frozen_bn
    trainable_layers = (3 if pretrained else 5) if trainable_layers is None else trainable_layers
    if skip_aware_norm is None:
        skip_aware_norm = weights.skip_aware_norm if weights is not None and weights.adaptive else True
    resnet = torchvision.models.get_model(
        spec.arch, weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    )
    if weights is not None and not weights.adaptive:
        load_backbone_state(resnet, weights)  # twins will start as copies of these norms
    backbone = resnet_fpn(resnet, trainable_layers, fpn_channels, nn.BatchNorm2d if spec.v2 else None)
    detector = _assemble(spec, backbone, num_classes, **detector_kwargs)
    convert_detector(detector, skip_aware_norm=skip_aware_norm)
    if weights is not None and weights.adaptive:
        load_backbone_state(detector.backbone.body, weights)
    detector.adn_info.update(
        detector=name, frozen_bn=frozen_bn, trainable_layers=trainable_layers, fpn_channels=fpn_channels
    )
    return detector


def convert_detector(detector: nn.Module, *, skip_aware_norm: bool = True) -> nn.Module:
    """Convert a torchvision detector with a ResNet-FPN backbone (``detector.backbone.body.layer1..``) into
    an adaptive depth detector, in place. Weights are kept and every twin starts as a copy of its norm
    (same type, same ``requires_grad``: twins of frozen norms stay frozen), so in super-net mode the
    detector computes exactly what it computed before."""
    if isinstance(detector, AdaptiveDepthNetwork):
        raise ValueError("this detector is already adaptive; convert the original detector once")
    body = getattr(getattr(detector, "backbone", None), "body", None)
    if body is None or not hasattr(body, "layer1"):
        raise TypeError(
            f"convert_detector needs a torchvision detector whose backbone is a ResNet with FPN "
            f"(detector.backbone.body.layer1, ...); {type(detector).__name__} has none. Build one with "
            f"adn.detection.build_detector or torchvision's *_resnet50_fpn builders"
        )
    specs = resnet_stages(body)
    for spec in specs:  # name stages by where they live in the detector
        spec.name = f"backbone.body.{spec.name}"
    return convert_stages(detector, specs, skip_aware_norm=skip_aware_norm, family="resnet-fpn-detector")


# ----- looking inside ------------------------------------------------------------------------------------------
@dataclass
class BackboneCapture:
    images: torch.Tensor | None = None  # the batched, normalized input the backbone saw
    features: dict | None = None  # its FPN output: level name -> feature map


@contextlib.contextmanager
def capture_backbone(detector: nn.Module) -> Iterator[BackboneCapture]:
    """Record the backbone's input and FPN features during forward passes inside the block (the
    detector's forward signature stays as torchvision's)."""
    seen = BackboneCapture()

    def hook(_module, inputs, output):
        seen.images, seen.features = inputs[0], output

    handle = detector.backbone.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def stage_levels(features: dict) -> list[str]:
    """FPN levels that come from the backbone's stages ('0'..'3'); the extra 'pool' level is P5
    subsampled, so distilling it would only weight P5 twice."""
    return [key for key in features if key != "pool"]

"""Adapter for torchvision's MobileNetV2 (any width multiplier).

``features`` holds the stem, 17 inverted-residual blocks and a final 1x1 conv. Blocks are grouped
into stages by the row of the inverted-residual setting they come from (t, c, n, s); the five stages
with n >= 2 are skippable. Norms outside those stages switch with the nearest skippable stage, as in the
authors' implementation: the stem and the first block with stage 1, the last block and the final
1x1 conv with stage 5."""

from __future__ import annotations

from torch import nn
from torchvision.models import MobileNetV2
from torchvision.models.mobilenetv2 import InvertedResidual

from .registry import StageSpec, register_adapter


def _stages(features: nn.Sequential) -> list[list[nn.Module]]:
    """A stage starts at every block without a residual connection (it changes stride or width: the
    first block of each row of the inverted-residual setting) and runs through the residual blocks
    after it. Grouping by width alone would merge rows that a small width multiplier rounds alike."""
    groups: list[list[nn.Module]] = []
    for module in features:
        if not isinstance(module, InvertedResidual):
            continue
        if not module.use_res_connect or not groups:
            groups.append([])
        groups[-1].append(module)
    return groups


@register_adapter("mobilenet_v2", "torchvision mobilenet_v2 (any width_mult)", lambda m: isinstance(m, MobileNetV2))
def mobilenet_v2_stages(model: MobileNetV2) -> list[StageSpec]:
    features = list(model.features)
    skippable = [g for g in _stages(model.features) if len(g) >= 2]
    first = next(i for i, m in enumerate(features) if m is skippable[0][0])
    last = next(i for i, m in enumerate(features) if m is skippable[-1][-1])
    specs = [StageSpec(f"stage{i + 1}", group, outside_branch=()) for i, group in enumerate(skippable)]
    specs[0].also_switch = features[:first]  # stem conv + the single-block stage before stage 1
    specs[-1].also_switch = features[last + 1 :]  # the single-block stage after stage 5 + the final 1x1 conv
    return specs

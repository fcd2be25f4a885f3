"""Adapter for torchvision's SwinTransformer (swin_t/s/b and swin_v2_t/s/b).

``features`` alternates stages (Sequentials of Swin blocks) and patch-merging layers. Stages are
split by the CNN rule (depths [2, 2, 6, 2] -> shared [1, 1, 3, 1]); the norms of shared blocks get
skip-aware twins, and so does the norm of the patch merging that *opens* a stage: it switches with that
stage, as a ResNet stage's downsampling first block does and as the authors' Swin does (their forward
passes stage k+1's flag to the merging between stages k and k+1). Shared blocks drop no paths
(stochastic depth) while their stage skips, as in the authors' Swin. Stage outputs are NHWC feature maps.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import SwinTransformer
from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2

from .registry import StageSpec, register_adapter


@register_adapter(
    "swin",
    "torchvision swin_t, swin_s, swin_b, swin_v2_t, swin_v2_s, swin_v2_b",
    lambda m: isinstance(m, SwinTransformer),
    channel_dim=-1,
)
def swin_stages(model: SwinTransformer) -> list[StageSpec]:
    features = list(model.features)
    specs = []
    for index, module in enumerate(features[1:], start=1):
        if isinstance(module, (PatchMerging, PatchMergingV2)) or not isinstance(module, nn.Sequential):
            continue
        preceding = features[index - 1]
        merge = [preceding] if isinstance(preceding, (PatchMerging, PatchMergingV2)) else []
        specs.append(
            StageSpec(
                f"features.{index}",
                list(module),
                outside_branch=(),
                also_switch=merge,
                idle_when_skipped=("stochastic_depth",),
            )
        )
    return specs

"""Adapter for torchvision's SwinTransformer (swin_t/s/b and swin_v2_t/s/b).

``features`` alternates stages (Sequentials of Swin blocks) and patch-merging layers. Stages are
split by the CNN rule (depths [2, 2, 6, 2] -> shared [1, 1, 3, 1]); the norms of shared blocks and the
norm of the patch merging that follows a stage get skip-aware twins switched by that stage. Stage
outputs are NHWC feature maps."""
from __future__ import annotations

from torch import nn
from torchvision.models import SwinTransformer
from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2

from . import StageSpec, register_adapter


@register_adapter("swin", "torchvision swin_t, swin_s, swin_b, swin_v2_t, swin_v2_s, swin_v2_b",
                  lambda m: isinstance(m, SwinTransformer), channel_dim=-1)
def swin_stages(model: SwinTransformer) -> list[StageSpec]:
    features = list(model.features)
    specs = []
    for index, module in enumerate(features[1:], start=1):
        if isinstance(module, (PatchMerging, PatchMergingV2)) or not isinstance(module, nn.Sequential):
            continue
        following = features[index + 1] if index + 1 < len(features) else None
        merge = [following] if isinstance(following, (PatchMerging, PatchMergingV2)) else []
        specs.append(StageSpec(f"features.{index}", list(module), outside_branch=(), also_switch=merge))
    return specs

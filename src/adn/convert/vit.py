"""Adapter for torchvision's VisionTransformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14).

A ViT has no stages, so consecutive encoder blocks are grouped into stages of ``VIT_GROUP`` (3, as
in the paper: ViT-B's 12 blocks -> 4 stages); the last block of each group is skippable and the
LayerNorms of the shared blocks get skip-aware twins. Stage outputs are token sequences [B, N, C]."""

from __future__ import annotations

from torchvision.models import VisionTransformer

from .registry import StageSpec, register_adapter

VIT_GROUP = 3


@register_adapter(
    "vit",
    "torchvision vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14 (stages of 3 blocks)",
    lambda m: isinstance(m, VisionTransformer),
    channel_dim=-1,
)
def vit_stages(model: VisionTransformer, group: int | None = None) -> list[StageSpec]:
    group = group or VIT_GROUP
    blocks = list(model.encoder.layers)
    if len(blocks) % group:
        raise ValueError(f"{len(blocks)} encoder blocks do not split into stages of {group}")
    return [
        StageSpec(f"blocks{i}-{i + group - 1}", blocks[i : i + group], num_shared=group - 1, outside_branch=())
        for i in range(0, len(blocks), group)
    ]

"""Adapters for timm models (optional: registered only when timm is installed).

Same machinery, timm's module names:
- ResNet family (``timm.models.resnet.ResNet``): ``layer1..4``, like torchvision's.
- ViT / DeiT (``VisionTransformer``): ``blocks`` in groups of 3, last of each group skippable.
- ConvNeXt: ``stages[i].blocks``; the LayerNorm of the downsampling layer that opens stage i switches
  with stage i (as Swin's patch merging and a ResNet stage's downsampling first block do).
- MobileNetV2 / EfficientNet (``EfficientNet``): ``blocks[i]`` with >= 2 blocks are skippable stages;
  the stem and the blocks before the first one switch with it, the blocks after the last one and the
  head with the last one (as torchvision's MobileNetV2).
"""

from __future__ import annotations

from .registry import StageSpec, register_adapter
from .vit import VIT_GROUP

try:
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer
except ImportError:  # timm is optional
    ConvNeXt = EfficientNet = ResNet = VisionTransformer = None


if ResNet is not None:

    @register_adapter(
        "timm-resnet", "timm resnet*, resnext*, wide_resnet*, seresnet* ...", lambda m: isinstance(m, ResNet)
    )
    def timm_resnet_stages(model) -> list[StageSpec]:
        return [
            StageSpec(f"layer{i}", list(getattr(model, f"layer{i}").children()))
            for i in range(1, 5)
            if hasattr(model, f"layer{i}")
        ]

    @register_adapter(
        "timm-vit",
        "timm vit_*, deit_* (stages of 3 blocks)",
        lambda m: isinstance(m, VisionTransformer),
        channel_dim=-1,
    )
    def timm_vit_stages(model) -> list[StageSpec]:
        blocks = list(model.blocks)
        if len(blocks) % VIT_GROUP:
            raise ValueError(f"{len(blocks)} transformer blocks do not split into stages of {VIT_GROUP}")
        return [
            StageSpec(
                f"blocks.{i}-{i + VIT_GROUP - 1}",
                blocks[i : i + VIT_GROUP],
                num_shared=VIT_GROUP - 1,
                outside_branch=(),
            )
            for i in range(0, len(blocks), VIT_GROUP)
        ]

    @register_adapter("timm-convnext", "timm convnext_*", lambda m: isinstance(m, ConvNeXt))
    def timm_convnext_stages(model) -> list[StageSpec]:
        stages = list(model.stages)
        specs = []
        for index, stage in enumerate(stages):
            opening = stage.downsample  # (an Identity in the first stage: the stem downsamples)
            switch = [opening] if any(True for _ in opening.parameters()) else []
            specs.append(StageSpec(f"stages.{index}", list(stage.blocks), outside_branch=(), also_switch=switch))
        return specs

    @register_adapter(
        "timm-efficientnet",
        "timm mobilenetv2_*, efficientnet_* (EfficientNet class)",
        lambda m: isinstance(m, EfficientNet),
    )
    def timm_efficientnet_stages(model) -> list[StageSpec]:
        groups = list(model.blocks)
        skippable = [i for i, g in enumerate(groups) if len(g) >= 2]
        specs = [StageSpec(f"blocks.{i}", list(groups[i]), outside_branch=()) for i in skippable]
        specs[0].also_switch = [model.conv_stem, model.bn1, *groups[: skippable[0]]]
        specs[-1].also_switch = [*groups[skippable[-1] + 1 :], model.conv_head, model.bn2]
        return specs

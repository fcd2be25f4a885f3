"""Adapter for the ResNet family: torchvision's ResNet/Wide ResNet/ResNeXt and adn's small ResNets.

Stages are ``layer1``, ``layer2``, ...; each block's ``downsample`` projection sees only the stage
input, so its BatchNorm gets no twin (as in the authors' implementation)."""

from __future__ import annotations

from torch import nn
from torchvision.models import ResNet

from ..models.small_resnet import SmallResNet
from .registry import StageSpec, register_adapter


def _is_resnet(model: nn.Module) -> bool:
    return isinstance(model, (ResNet, SmallResNet))


@register_adapter(
    "resnet",
    "torchvision resnet18/34/50/101/152, wide_resnet50_2/101_2, resnext50_32x4d/101_32x8d/101_64x4d; "
    "adn small ResNets resnet20/32/44/56/110",
    _is_resnet,
)
def resnet_stages(model: nn.Module) -> list[StageSpec]:
    specs = []
    index = 1
    while hasattr(model, f"layer{index}"):
        layer = getattr(model, f"layer{index}")
        specs.append(StageSpec(f"layer{index}", list(layer.children()), outside_branch=("downsample",)))
        index += 1
    return specs

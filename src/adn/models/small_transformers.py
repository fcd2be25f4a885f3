"""Small MobileNetV2 and ViT for 28/32-pixel images (Fashion-MNIST, CIFAR), built from torchvision's
own classes so that they convert through the very same adapters as their ImageNet-sized siblings."""

from __future__ import annotations

from torch import nn
from torchvision.models import MobileNetV2, VisionTransformer

# (expansion t, width c, blocks n, stride s) as in MobileNetV2, with the strides placed for 28-32 px:
# a stride-1 stem, then 28 -> 14 -> 7 -> 4.
SMALL_MOBILENET_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def mobilenet_v2_small(num_classes: int = 10, in_channels: int = 3, width_mult: float = 0.5, **kwargs) -> MobileNetV2:
    """MobileNetV2 for small images: 5 skippable stages like the ImageNet model, stride-1 stem."""
    model = MobileNetV2(
        num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=SMALL_MOBILENET_SETTING, **kwargs
    )
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


def vit_small_images(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 28,
    patch_size: int = 4,
    num_layers: int = 6,
    hidden_dim: int = 96,
    num_heads: int = 4,
    mlp_dim: int = 192,
    **kwargs,
) -> VisionTransformer:
    """A 6-block ViT (2 stages of 3 blocks) with 4x4 patches: 49 tokens for 28 px, 64 for 32 px."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    model = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        num_classes=num_classes,
        **kwargs,
    )
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
    return model

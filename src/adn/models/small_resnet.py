"""Residual networks for small images (CIFAR, Fashion-MNIST), in the style of He et al.'s CIFAR
ResNet-20/32/44/56/110, built from torchvision's own ``BasicBlock`` and ``Bottleneck``.

Three stages at full, 1/2 and 1/4 resolution; a 3x3 stem with no max-pool (small images have no
resolution to spare); projection shortcuts (conv1x1 + BN) where the shape changes, as torchvision."""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3


class SmallResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 1 or width < 1:
            raise ValueError(
                f"in_channels, num_classes and width must be positive, got {in_channels}, {num_classes}, {width}"
            )
        self.inplanes = width
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        for index, blocks in enumerate(layers):
            stride = 1 if index == 0 else 2
            setattr(self, f"layer{index + 1}", self._make_layer(block, width * 2**index, blocks, stride))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                last_bn = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else getattr(m, "bn2", None)
                if isinstance(m, (BasicBlock, Bottleneck)) and last_bn is not None:
                    nn.init.zeros_(last_bn.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        index = 1
        while hasattr(self, f"layer{index}"):
            x = getattr(self, f"layer{index}")(x)
            index += 1
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def _small(depth: int):
    if (depth - 2) % 6:
        raise ValueError(f"small ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6

    def build(num_classes: int = 10, in_channels: int = 3, width: int = 16, **kwargs) -> SmallResNet:
        return SmallResNet(
            BasicBlock, [n, n, n], num_classes=num_classes, in_channels=in_channels, width=width, **kwargs
        )

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"ResNet-{depth} for small images: 3 stages of {n} BasicBlocks, widths w, 2w, 4w (w=16 by default)."
    return build


resnet20 = _small(20)
resnet32 = _small(32)
resnet44 = _small(44)
resnet56 = _small(56)
resnet110 = _small(110)

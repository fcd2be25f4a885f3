"""Prints the markdown table of docs/architectures.md from measurements (`adn profile` machinery)."""

import torch

import adn
from adn.runtime.profile import count_macs

MODELS = [
    ("resnet18", 224),
    ("resnet34", 224),
    ("resnet50", 224),
    ("resnet101", 224),
    ("resnet152", 224),
    ("wide_resnet50_2", 224),
    ("resnext50_32x4d", 224),
    ("mobilenet_v2", 224),
    ("vit_b_16", 224),
    ("vit_b_32", 224),
    ("swin_t", 224),
    ("swin_s", 224),
    ("swin_v2_t", 256),
    ("resnet20", 32),
    ("resnet56", 32),
    ("timm/resnet50", 224),
    ("timm/vit_base_patch16_224", 224),
    ("timm/deit_small_patch16_224", 224),
    ("timm/convnext_tiny", 224),
    ("timm/mobilenetv2_100", 224),
]

print(
    "| model | input | stages (shared+skippable blocks) | params super / base (M) | MACs super / base (G) | base/super MACs |"
)
print("|---|---|---|---|---|---|")
for name, size in MODELS:
    net = adn.convert(adn.build_model(name, num_classes=1000 if size > 32 else 10)).eval()
    x = torch.randn(1, 3, size, size)
    sup, base = (net.subnet(adn.SkipConfig(s, net.num_stages)) for s in ("super", "base"))
    ms, mb = count_macs(sup, x), count_macs(base, x)
    ps, pb = (sum(p.numel() for p in m.parameters()) for m in (sup, base))
    split = " ".join(f"{len(s.shared)}+{len(s.skippable)}" for s in net.adn_stages)
    print(
        f"| {name} | {size} | {split} | {ps / 1e6:.2f} / {pb / 1e6:.2f} | {ms / 1e9:.3f} / {mb / 1e9:.3f} | {mb / ms:.3f} |"
    )

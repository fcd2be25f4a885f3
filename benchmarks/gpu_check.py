"""GPU sanity check (run where CUDA exists): conversion equality, every sub-network on CUDA, a short
training run with Algorithm 1, and the latency of every ResNet-50 sub-network relative to its MACs.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import json
import sys

import torch
import torchvision

import adn
from adn.runtime.profile import profile_subnetworks
from adn.vision.train_config import TrainConfig
from adn.vision.train import train


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: nothing to check")
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(device)
    x = torch.randn(8, 3, 224, 224, device=device)
    with torch.no_grad():
        reference = model(x)
        net = adn.convert(model).eval()
        diff = (net(x) - reference).abs().max().item()
        print(f"super-net vs original on CUDA: max abs diff {diff:.2e}")
        assert diff < 1e-4
        for config in adn.SkipConfig.all(4):
            assert torch.allclose(net.subnet(config)(x), net(x, skip=config), atol=1e-4)
    print("all 16 sub-networks agree with their standalone subnet() on CUDA")

    record = train(
        TrainConfig(
            model="resnet50",
            data="fake",
            train_crop_size=64,
            epochs=2,
            batch_size=32,
            max_steps_per_epoch=8,
            output_dir="/tmp/adn-gpu-run",
            device="cuda",
            progress=False,
            lr=0.01,
        )
    )
    print("training on CUDA:", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))

    for batch in (1, 64):
        example = torch.randn(batch, 3, 224, 224, device=device)
        rows = profile_subnetworks(net, example, warmup=10, repeats=30)
        print(
            f"\nResNet-50-ADN on {torch.cuda.get_device_name()}, batch {batch}, fp32, eager, median of 30 interleaved rounds"
        )
        print(f"{'skip':>5} {'MACs/super':>11} {'latency/super':>14} {'latency ms':>11}")
        for row in rows:
            print(
                f"{row['skip']:>5} {row['macs'] / rows[0]['macs']:>11.3f} "
                f"{row['latency_ms'] / rows[0]['latency_ms']:>14.3f} {row['latency_ms']:>11.3f}"
            )


if __name__ == "__main__":
    main()

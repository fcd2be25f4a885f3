"""Cost of Algorithm 1 relative to plain training of the same model.

Time: median step time of an ADN step (super-net forward+backward, then base-net forward+backward with
feature distillation) / median step time of a plain step (super-net forward+backward), both with an SGD
update, measured alternately in one process. A base-net-only step (forward+backward) is timed too, to
split the ADN step's cost.

Memory (CUDA only, where the allocator reports exact peaks): peak allocated memory during an ADN step /
during a plain step, after the same warm-up. CPU resident-set figures do not isolate a step's memory
(the process peak is reached while building the model), so none are reported on CPU.

Targets (issue 2): time ratio <= 1.65 (super+base MACs / super MACs = 1.63 for ResNet-50),
memory ratio <= 1.15.

    python benchmarks/train_step.py [--model resnet50 --size 112 --batch 16 --steps 10 --device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn


def build(model_name: str, size: int, batch: int):
    import adn

    torch.manual_seed(0)
    net = adn.convert(adn.build_model(model_name, num_classes=1000)).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    return net, optimizer, x, y


def plain_step(net, optimizer, x, y, criterion=None):
    criterion = criterion or nn.CrossEntropyLoss()
    optimizer.zero_grad(set_to_none=True)
    criterion(net(x), y).backward()
    optimizer.step()


def adn_step(net, optimizer, x, y, loss=None):
    from adn.core.distill import SubPathDistillationLoss
    from adn.training.methods import adn_step as step

    optimizer.zero_grad(set_to_none=True)
    step(net, x, y, loss or SubPathDistillationLoss(feature_kd="spatial"))
    optimizer.step()


def base_step(net, optimizer, x, y, criterion=None):
    criterion = criterion or nn.CrossEntropyLoss()
    optimizer.zero_grad(set_to_none=True)
    with net.skipping("base"):
        criterion(net(x), y).backward()
    optimizer.step()


def timed(step, net, optimizer, x, y) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    step(net, optimizer, x, y)
    sync()
    return time.perf_counter() - start


def peak_memory(step, net, optimizer, x, y) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(net, optimizer, x, y)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    net, optimizer, x, y = build(args.model, args.size, args.batch)
    device = torch.device(args.device)
    net.to(device)
    x, y = x.to(device), y.to(device)
    steps = {"plain": plain_step, "adn": adn_step, "base": base_step}
    for _ in range(2):  # warm-up (also creates the optimizer state)
        for step in steps.values():
            step(net, optimizer, x, y)
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(timed(step, net, optimizer, x, y))
    median = {name: statistics.median(values) for name, values in times.items()}

    from adn.runtime.profile import count_macs

    with net.skipping("super"):
        super_macs = count_macs(net, x[:1])
    with net.skipping("base"):
        base_macs = count_macs(net, x[:1])
    result = {
        "model": args.model,
        "input": args.size,
        "batch": args.batch,
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        **{f"{name}_step_s": value for name, value in median.items()},
        "time_ratio": median["adn"] / median["plain"],
        "mac_ratio_super_plus_base": (super_macs + base_macs) / super_macs,
    }
    where = result["gpu"] or f"CPU, {result['threads']} threads"
    print(f"{args.model} {args.size}x{args.size}, batch {args.batch}, {where}, median of {args.steps} steps each")
    print(
        f"  plain step {median['plain'] * 1e3:.1f} ms, base-net-only step {median['base'] * 1e3:.1f} ms, "
        f"ADN step {median['adn'] * 1e3:.1f} ms"
    )
    print(
        f"  time ratio ADN / plain {result['time_ratio']:.3f} (target <= 1.65; MAC ratio "
        f"{result['mac_ratio_super_plus_base']:.3f})"
    )
    if device.type == "cuda":
        plain_peak = peak_memory(plain_step, net, optimizer, x, y)
        adn_peak = peak_memory(adn_step, net, optimizer, x, y)
        result.update(
            peak_plain_mib=plain_peak / 2**20, peak_adn_mib=adn_peak / 2**20, memory_ratio=adn_peak / plain_peak
        )
        print(
            f"  peak memory plain {plain_peak / 2**20:.0f} MiB, ADN {adn_peak / 2**20:.0f} MiB: ratio "
            f"{result['memory_ratio']:.3f} (target <= 1.15)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

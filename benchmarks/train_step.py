"""Cost of Algorithm 1 relative to plain training of the same model.

Time: median step time of an ADN step (super-net forward+backward, then base-net forward+backward with
feature distillation) / median step time of a plain step (super-net forward+backward), both with an SGD
update, measured alternately in one process. Memory: peak resident memory of a fresh process running
only ADN steps / of one running only plain steps (ru_maxrss), and the same ratio for the increase over
the process's memory just before its first step.

Targets (issue 2): time ratio <= 1.65 (super+base MACs / super MACs = 1.63 for ResNet-50),
memory ratio <= 1.15.

    python benchmarks/train_step.py [--model resnet50 --size 112 --batch 16 --steps 10]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
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


def plain_step(net, optimizer, x, y, criterion=nn.CrossEntropyLoss()):
    optimizer.zero_grad(set_to_none=True)
    criterion(net(x), y).backward()
    optimizer.step()


def adn_step(net, optimizer, x, y, loss=None):
    from adn.distill import SubPathDistillationLoss
    from adn.train import adn_step as step
    optimizer.zero_grad(set_to_none=True)
    step(net, x, y, loss or SubPathDistillationLoss(feature_kd="spatial"))
    optimizer.step()


def memory_child(mode: str, model_name: str, size: int, batch: int, steps: int) -> None:
    net, optimizer, x, y = build(model_name, size, batch)
    step = adn_step if mode == "adn" else plain_step
    step(net, optimizer, x, y)  # first step allocates optimizer state; count it in the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        step(net, optimizer, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": peak, "before_kib": before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--memory-child", choices=("adn", "plain"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.model, args.size, args.batch, 3)
        return

    net, optimizer, x, y = build(args.model, args.size, args.batch)
    for _ in range(2):  # warm-up
        plain_step(net, optimizer, x, y)
        adn_step(net, optimizer, x, y)
    times = {"plain": [], "adn": []}
    for _ in range(args.steps):
        for name, step in (("plain", plain_step), ("adn", adn_step)):
            start = time.perf_counter()
            step(net, optimizer, x, y)
            times[name].append(time.perf_counter() - start)
    plain, adn_t = statistics.median(times["plain"]), statistics.median(times["adn"])

    memory = {}
    for mode in ("plain", "adn"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--model", args.model, "--size",
                              str(args.size), "--batch", str(args.batch)], capture_output=True, text=True, check=True)
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])

    from adn.profile import count_macs
    with net.skipping("super"):
        super_macs = count_macs(net, x[:1])
    with net.skipping("base"):
        base_macs = count_macs(net, x[:1])
    result = {
        "model": args.model, "input": args.size, "batch": args.batch, "threads": torch.get_num_threads(),
        "steps": args.steps, "plain_step_s": plain, "adn_step_s": adn_t, "time_ratio": adn_t / plain,
        "mac_ratio_super_plus_base": (super_macs + base_macs) / super_macs,
        "peak_rss_ratio": memory["adn"]["peak_kib"] / memory["plain"]["peak_kib"],
        "peak_increase_ratio": (memory["adn"]["peak_kib"] - memory["adn"]["before_kib"])
        / max(1, memory["plain"]["peak_kib"] - memory["plain"]["before_kib"]),
        "peak_rss_mib": {k: v["peak_kib"] / 1024 for k, v in memory.items()},
    }
    print(f"{args.model} {args.size}x{args.size}, batch {args.batch}, {result['threads']} threads, "
          f"median of {args.steps} steps each")
    print(f"  plain step {plain * 1e3:.0f} ms, ADN step {adn_t * 1e3:.0f} ms: time ratio {result['time_ratio']:.3f} "
          f"(target <= 1.65; MAC ratio {result['mac_ratio_super_plus_base']:.3f})")
    print(f"  peak RSS plain {result['peak_rss_mib']['plain']:.0f} MiB, ADN {result['peak_rss_mib']['adn']:.0f} MiB: "
          f"ratio {result['peak_rss_ratio']:.3f} (target <= 1.15); growth during steps ratio "
          f"{result['peak_increase_ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

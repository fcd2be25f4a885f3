"""Run-time speed-up of skipping, and the cost of the skip machinery.

1. For every sub-network of ResNet-50: latency / super-net latency next to MACs / super-net MACs, at
   batch 1 and batch 16, timed in interleaved rounds (one run per depth per round), medians.
2. Overhead: the ADN at a depth vs a plain torchvision ResNet-50 with the same blocks removed (same
   weights), interleaved. Target (issue 2): ratio <= 1.02.

    python benchmarks/latency.py [--size 224 --repeats 7 --batches 1 16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchvision

import adn
from adn.profile import count_macs, measure_depth_latencies


def plain_resnet_without(config) -> torch.nn.Module:
    """A torchvision ResNet-50 with the skippable blocks of the skipped stages deleted."""
    model = torchvision.models.resnet50()
    for index, skipped in enumerate(config):
        layer = getattr(model, f"layer{index + 1}")
        if skipped:
            for name in list(layer._modules)[adn.split_point(len(layer)):]:
                del layer._modules[name]
    return model


def overhead(net, config, x, repeats: int) -> float:
    plain = plain_resnet_without(config)
    plain.load_state_dict(net.subnet(config).state_dict())
    plain.eval()
    net.eval()
    times = {"adn": [], "plain": []}
    with torch.inference_mode(), net.skipping(config):
        for i in range(repeats + 2):
            for name, model in (("adn", net), ("plain", plain)):
                start = time.perf_counter()
                model(x)
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
    return statistics.median(times["adn"]) / statistics.median(times["plain"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    torch.manual_seed(0)
    net = adn.convert(torchvision.models.resnet50()).eval()
    configs = adn.SkipConfig.all(net.num_stages)
    macs = {str(c): count_macs(net.subnet(c), torch.randn(1, 3, args.size, args.size)) for c in configs}
    results = {"threads": torch.get_num_threads(), "size": args.size, "repeats": args.repeats, "batches": {}}
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size)
        rows = measure_depth_latencies(net, x, configs, warmup=2, repeats=args.repeats)
        super_ms = rows[0]["latency_ms"]
        print(f"\nResNet-50-ADN, batch {batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
              f"median of {args.repeats} interleaved rounds")
        print(f"{'skip':>5} {'MACs/super':>11} {'latency/super':>14} {'latency ms':>11}")
        table = []
        for config, row in zip(configs, rows):
            mac_ratio = macs[str(config)] / macs[str(configs[0])]
            ratio = row["latency_ms"] / super_ms
            table.append({"skip": str(config), "mac_ratio": mac_ratio, "latency_ratio": ratio, "latency_ms": row["latency_ms"]})
            print(f"{str(config):>5} {mac_ratio:>11.3f} {ratio:>14.3f} {row['latency_ms']:>11.2f}")
        over = {c: overhead(net, adn.SkipConfig(c), x, args.repeats) for c in ("FFFF", "TTFF", "TTTT")}
        print("ADN / plain torchvision with the same blocks removed: "
              + ", ".join(f"{c} {v:.3f}" for c, v in over.items()) + " (target <= 1.02)")
        results["batches"][batch] = {"rows": table, "overhead": over}
    print(json.dumps(results))


if __name__ == "__main__":
    main()

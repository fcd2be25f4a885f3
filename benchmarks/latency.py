"""Run-time speed-up of skipping, and the cost of the skip machinery.

1. For every sub-network of ResNet-50: latency / super-net latency next to MACs / super-net MACs, at
   batch 1 and batch 16, in eager PyTorch and (with --onnxruntime) in ONNX Runtime, every runner timed
   in interleaved rounds (one call of each depth on each engine per round), medians.
   Targets (issue 4): ORT base-net latency ratio within 0.05 of its MAC ratio (0.626); ORT >= 1.3x
   faster than eager for the same sub-network.
2. Overhead: the ADN at a depth vs a plain torchvision ResNet-50 with the same blocks removed (same
   weights), interleaved, without and with per-depth batch-norm statistics (``adn recalibrate``: the
   row of the depth is chosen per forward). Target: both ratios <= 1.02.

    python benchmarks/latency.py [--size 224 --repeats 7 --batches 1 16 --onnxruntime --threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torchvision

import adn
from adn.runtime.backends import OnnxDepths, depth_runners
from adn.runtime.profile import count_macs, time_interleaved


def _numpy_runner(run):
    """An ONNX Runtime runner (numpy in) called like the eager ones (a tensor in)."""
    return lambda t: run(t.numpy())


def plain_resnet_without(config) -> torch.nn.Module:
    """A torchvision ResNet-50 with the skippable blocks of the skipped stages deleted."""
    model = torchvision.models.resnet50()
    for index, skipped in enumerate(config):
        layer = getattr(model, f"layer{index + 1}")
        if skipped:
            for name in list(layer._modules)[adn.split_point(len(layer)) :]:
                del layer._modules[name]
    return model


def overhead(nets: dict, config, x, repeats: int) -> dict[str, float]:
    """Median latency of each network in ``nets`` at ``config`` over that of the plain torchvision model."""
    first = next(iter(nets.values()))
    plain = plain_resnet_without(config)
    plain.load_state_dict(first.subnet(config).state_dict())
    models = {**{name: net.eval() for name, net in nets.items()}, "plain": plain.eval()}
    times = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(repeats + 2):
            for name, model in models.items():
                start = time.perf_counter()
                model(x) if name == "plain" else model(x, skip=config)
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
    plain_median = statistics.median(times["plain"])
    return {name: statistics.median(times[name]) / plain_median for name in nets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--repeats",
        type=int,
        nargs="+",
        default=[7],
        help="timed rounds, one value for all batch sizes or one per batch size",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--onnxruntime", action="store_true", help="also time every sub-network in ONNX Runtime")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = dict(zip(args.batches, args.repeats * len(args.batches) if len(args.repeats) == 1 else args.repeats))
    torch.manual_seed(0)
    net = adn.convert(torchvision.models.resnet50()).eval()
    configs = adn.SkipConfig.all(net.num_stages)
    macs = {str(c): count_macs(net.subnet(c), torch.randn(1, 3, args.size, args.size)) for c in configs}
    engines = ["eager"]
    onnx = None
    if args.onnxruntime:
        started = time.perf_counter()
        onnx = OnnxDepths(net, torch.randn(1, 3, args.size, args.size), configs)
        engines.append("onnxruntime")
        print(
            f"exported {len(configs)} sub-networks to ONNX in {time.perf_counter() - started:.0f}s "
            f"(ONNX Runtime threads: {onnx.threads})"
        )
    with_statistics = copy.deepcopy(net)
    adn.record_depth_statistics(with_statistics, [torch.randn(4, 3, args.size, args.size)], num_batches=1)
    results = {"threads": torch.get_num_threads(), "size": args.size, "batches": {}}
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size)
        runners, _ = depth_runners(net, x, configs, "eager")
        if onnx is not None:
            runners += [_numpy_runner(onnx.runner(c)) for c in configs]
        times = time_interleaved(runners, x, warmup=1, repeats=repeats[batch])
        medians = [statistics.median(t) for t in times]
        per_engine = {engine: medians[i * len(configs) : (i + 1) * len(configs)] for i, engine in enumerate(engines)}
        print(
            f"\nResNet-50-ADN, batch {batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
            f"median of {repeats[batch]} interleaved rounds"
        )
        header = f"{'skip':>5} {'MACs/super':>11}" + "".join(
            f" {e[:4] + ' lat/super':>14} {e[:4] + ' ms':>10}" for e in engines
        )
        print(header + (f" {'eager/ORT':>10}" if onnx else ""))
        table = []
        for i, config in enumerate(configs):
            row = {"skip": str(config), "mac_ratio": macs[str(config)] / macs[str(configs[0])]}
            line = f"{str(config):>5} {row['mac_ratio']:>11.3f}"
            for engine, values in per_engine.items():
                row[f"{engine}_ms"] = values[i]
                row[f"{engine}_ratio"] = values[i] / values[0]
                line += f" {row[f'{engine}_ratio']:>14.3f} {values[i]:>10.2f}"
            if onnx:
                row["ort_speedup"] = row["eager_ms"] / row["onnxruntime_ms"]
                line += f" {row['ort_speedup']:>10.2f}"
            table.append(row)
            print(line)
        if onnx:
            base = table[-1]
            print(
                f"ORT base-net latency ratio {base['onnxruntime_ratio']:.3f} vs MAC ratio {base['mac_ratio']:.3f}: "
                f"off by {abs(base['onnxruntime_ratio'] - base['mac_ratio']):.3f} (target <= 0.05); "
                f"ORT speed-up over eager {min(r['ort_speedup'] for r in table):.2f}-"
                f"{max(r['ort_speedup'] for r in table):.2f}x (target >= 1.3)"
            )
        over = {
            c: overhead({"adn": net, "adn_depth_statistics": with_statistics}, adn.SkipConfig(c), x, repeats[batch])
            for c in ("FFFF", "TTFF", "TTTT")
        }
        print(
            "ADN / plain torchvision with the same blocks removed: "
            + ", ".join(f"{c} {v['adn']:.3f}" for c, v in over.items())
            + "; with per-depth statistics: "
            + ", ".join(f"{c} {v['adn_depth_statistics']:.3f}" for c, v in over.items())
            + " (target <= 1.02)"
        )
        results["batches"][batch] = {"rows": table, "overhead": over}
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""One switchable ONNX file (every depth, ``skip`` as an input) against per-depth ONNX files, on the CPU.

ResNet-50 (torchvision, random weights, converted with adn.convert, eval mode; twins and running statistics
perturbed so that every norm differs from its twin, as after training) at 224x224, ONNX Runtime, 1 thread:

- memory: resident memory added by loading a session (and after one batch-1 run), each file measured in a
  fresh subprocess that imports only numpy and onnxruntime;
- latency per depth at each batch size: the switchable session fed that depth's ``skip`` and the depth's own
  per-depth session, medians of alternating runs;
- preparation: export (unverified) + session creation, switchable vs the super-net alone (``--prep-rounds``
  alternating rounds, medians), with where the export's time goes (torch.export's tracing, its
  decompositions, the rest of torch.onnx: translation, optimization, our branch rewrites and writing the
  file) and, apart, what verifying costs (every depth of the switchable file; the super-net's file alone);
- file sizes.

Targets (issue 23): memory <= 1.15x, latency <= 1.05x per depth, preparation <= 1.5x.

Also MobileNetV2 and ViT-B/16 (``--model``), the same way.

    OMP_NUM_THREADS=1 python benchmarks/switchable_onnx.py [--model resnet50] [--depths FFFF TTTT] [--repeats 10 3]
        [--prep-rounds 1] [--json results/switchable/resnet50.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

import adn
from adn.runtime.graph_export import verify_onnx
from adn.runtime.switchable import switchable_differences, write_switchable_onnx

# Run in a fresh interpreter: loads a session and reports VmRSS deltas (kB). Only numpy + onnxruntime.
MEMORY_PROBE = """
import sys, numpy as np, onnxruntime as ort
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1; o.log_severity_level = 3
o.graph_optimization_level = ort.GraphOptimizationLevel(int(sys.argv[2]))
before = rss()
s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])
loaded = rss()
feed = {'images': np.zeros((1, 3, 224, 224), np.float32)}
if len(s.get_inputs()) > 1:
    feed['skip'] = np.zeros(s.get_inputs()[1].shape[0], bool)
s.run(None, feed)
print(loaded - before, rss() - before)
"""


def session(path, level):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_subnet(net, config, example, path) -> None:
    """The per-depth file as adn export writes it (same exporter settings), unverified."""
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            net.subnet(config).eval(),
            (example,),
            str(path),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=["images"],
            output_names=["logits"],
            verbose=False,
            external_data=False,
        )


def trained_looking(net):
    """Norms that differ from their twins (random init makes them exact copies, which the exporter may
    deduplicate, hiding the cost of choosing between them)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith(("running_mean", "bias")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.4 - 0.2)
            elif name.endswith("running_var") or (name.endswith("weight") and tensor.dim() == 1):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return net.eval()


@contextlib.contextmanager
def export_phases():
    """Times torch.export's tracing and its decompositions inside torch.onnx.export: yields a dict that holds
    their seconds once the block ends."""
    phases = {"torch_export": 0.0, "decompositions": 0.0}
    originals = torch.export.export, torch.export.ExportedProgram.run_decompositions

    def timed(name, function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - start

        return run

    torch.export.export = timed("torch_export", originals[0])
    torch.export.ExportedProgram.run_decompositions = timed("decompositions", originals[1])
    try:
        yield phases
    finally:
        torch.export.export, torch.export.ExportedProgram.run_decompositions = originals


def prepare(write, path, level) -> dict:
    """Export with ``write(path)`` and open a session: seconds of each phase."""
    with export_phases() as phases:
        start = time.perf_counter()
        write(path)
        exported = time.perf_counter()
    session(path, level)
    phases.update(export=exported - start, session=time.perf_counter() - exported)
    phases["onnx_rest"] = phases["export"] - phases["torch_export"] - phases["decompositions"]
    phases["total"] = phases["export"] + phases["session"]
    return phases


def machine() -> str:
    return next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown"
    )


def memory(path, level) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path), str(int(level))],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout.split()
    return int(out[0]), int(out[1])


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="resnet50",
        choices=["resnet50", "mobilenet_v2", "vit_b_16"],
        help="torchvision model, random weights, 224x224",
    )
    parser.add_argument("--depths", nargs="*", help="depths to time (default: all 2^N)")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 16])
    parser.add_argument("--repeats", nargs="*", type=int, default=[10, 3], help="timed runs per batch size")
    parser.add_argument(
        "--level",
        choices=["basic", "extended", "all"],
        default="all",
        help="graph optimization level of the switchable session (per-depth ones: all)",
    )
    parser.add_argument("--folder", help="keep the files here (default: a temporary folder)")
    parser.add_argument("--prep-rounds", type=int, default=1, help="alternating preparation rounds (medians)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    level, best = levels[args.level], ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    torch.manual_seed(0)
    net = trained_looking(adn.convert(getattr(torchvision.models, args.model)()))
    super_net = str(adn.SkipConfig.super_net(net.num_stages))
    depths = [adn.SkipConfig(d, net.num_stages) for d in args.depths] if args.depths else net.sub_networks()
    example = torch.randn(2, 3, 224, 224)
    results: dict = {
        "settings": {
            "model": f"{args.model} 224x224, random weights",
            "threads": 1,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "switchable_level": args.level,
            "machine": f"{machine()}, {os.cpu_count()} cores",
            "prep_rounds": args.prep_rounds,
            "repeats": dict(zip(map(str, args.batch_sizes), args.repeats)),
        }
    }
    with contextlib.ExitStack() as stack:
        folder = Path(args.folder or stack.enter_context(tempfile.TemporaryDirectory(prefix="adn-switchable-")))
        folder.mkdir(parents=True, exist_ok=True)
        switchable = folder / "switchable.onnx"

        # Preparation: export + session creation, the switchable file vs the super-net's file, alternating.
        super_path = folder / f"subnet_{super_net}.onnx"
        rounds: dict = {"switchable": [], "super_net": []}
        for _ in range(args.prep_rounds):
            rounds["switchable"].append(
                prepare(lambda path: write_switchable_onnx(net, example, path), switchable, level)
            )
            rounds["super_net"].append(
                prepare(lambda path: export_subnet(net, super_net, example, path), super_path, best)
            )
        median = {
            name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()
        }
        start = time.perf_counter()
        switchable_differences(switchable, net, example)
        median["switchable"]["verify_every_depth"] = time.perf_counter() - start
        start = time.perf_counter()
        verify_onnx(super_path, net.subnet(super_net).eval(), example)
        median["super_net"]["verify"] = time.perf_counter() - start
        results["preparation_s"] = {**median, "ratio": median["switchable"]["total"] / median["super_net"]["total"]}
        print("preparation (s):", json.dumps(median), flush=True)

        # Memory, each in a fresh process.
        mem_switch, mem_super = memory(switchable, level), memory(super_path, best)
        results["memory_kB"] = {
            "switchable": {"loaded": mem_switch[0], "after_run": mem_switch[1]},
            "super_net": {"loaded": mem_super[0], "after_run": mem_super[1]},
            "ratio_loaded": mem_switch[0] / mem_super[0],
            "ratio_after_run": mem_switch[1] / mem_super[1],
        }
        results["file_bytes"] = {"switchable": switchable.stat().st_size, "super_net": super_path.stat().st_size}

        # Latency per depth, alternating the two sessions so that drift hits both alike.
        switch_session = session(switchable, level)
        latency = {}
        for config in depths:
            path = folder / f"subnet_{config}.onnx"
            if not path.exists():
                export_subnet(net, config, example, path)
            per_depth = session(path, best)
            flags = np.array(config, dtype=bool)
            for batch, repeats in zip(args.batch_sizes, args.repeats):
                images = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
                switch_feed, depth_feed = {"images": images, "skip": flags}, {"images": images}
                runs = {
                    "switchable": lambda feed=switch_feed: switch_session.run(None, feed)[0],
                    "per_depth": lambda session=per_depth, feed=depth_feed: session.run(None, feed)[0],
                }
                outputs = {name: run() for name, run in runs.items()}  # warm-up, and the outputs must agree
                times: dict = {name: [] for name in runs}
                for _ in range(repeats):
                    for name, run in runs.items():
                        start = time.perf_counter()
                        run()
                        times[name].append(time.perf_counter() - start)
                median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                latency[f"{config} b{batch}"] = {
                    "switchable_ms": median["switchable"],
                    "per_depth_ms": median["per_depth"],
                    "ratio": median["switchable"] / median["per_depth"],
                    "max_difference": float(np.abs(outputs["switchable"] - outputs["per_depth"]).max()),
                }
                print(
                    f"{config} batch {batch:2d}: switchable {median['switchable']:8.1f} ms  per-depth "
                    f"{median['per_depth']:8.1f} ms  ratio {latency[f'{config} b{batch}']['ratio']:.3f}",
                    flush=True,
                )
        results["latency"] = latency
    ratios = [entry["ratio"] for entry in latency.values()]
    print(json.dumps(results, indent=1))
    print(
        f"memory ratio (loaded / after a run): {results['memory_kB']['ratio_loaded']:.2f} / "
        f"{results['memory_kB']['ratio_after_run']:.2f} (target <= 1.15)"
    )
    print(f"latency ratio per depth: median {statistics.median(ratios):.3f}, worst {max(ratios):.3f} (target <= 1.05)")
    print(f"preparation ratio: {results['preparation_s']['ratio']:.2f} (target <= 1.5)")
    print(f"file size ratio: {results['file_bytes']['switchable'] / results['file_bytes']['super_net']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

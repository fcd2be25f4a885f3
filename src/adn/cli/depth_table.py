"""``adn depth-table``: the latency of every Pareto-optimal depth at several batch sizes, for serving."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..core.skip import SkipConfig
from .common import positive_int, read_rows


def _batch_size_list(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,8,32, got {text!r}")
    return sizes


def add(sub) -> None:
    from ..deploy.depth_table import DEFAULT_BATCH_SIZES

    p = sub.add_parser(
        "depth-table",
        help="latency (p50, p99) of the Pareto-optimal depths at several batch sizes, "
        "with their accuracy: the table adn.Governor and adn pareto --budget-ms read",
        description="Times every depth of `adn eval --json` on this machine at each batch size "
        "(interleaved rounds), keeps the depths on the accuracy-vs-latency Pareto front at "
        "some batch size, and writes them as plain JSON (schema: docs/serving.md).",
    )
    p.add_argument("--checkpoint", required=True, help="file written by adn train")
    p.add_argument("--eval", required=True, dest="eval_json", help="file with the output of adn eval --json (acc1)")
    p.add_argument(
        "--backend",
        default="eager",
        choices=("eager", "onnxruntime", "onnxruntime-per-depth"),
        help="engine that will serve (onnxruntime: one switchable session for every depth; "
        "onnxruntime-per-depth: one session per depth; see adn serve --help)",
    )
    p.add_argument(
        "--batch-sizes",
        type=_batch_size_list,
        default=",".join(map(str, DEFAULT_BATCH_SIZES)),
        help="comma-separated batch sizes to time, e.g. 1,8,32",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds per batch size")
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=100,
        help="timed rounds per batch size; p99 is by nearest rank, so below 100 it is the slowest run",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument(
        "--output",
        default=None,
        help="JSON to write (default: depth_table.json next to the checkpoint); an existing file is "
        "replaced only if it is a depth table, or with --overwrite, and never --eval or --checkpoint",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output that is not a depth table")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..utils.atomic import atomic_write
    from ..utils.outputs import OutputKind, json_file, output_path
    from ..vision.checkpoint import load_network
    from ..deploy.depth_table import FORMAT, VERSION, DepthTable, conditions, dumps, front, measure_latencies

    kind = OutputKind(
        "a depth table adn wrote",
        "depth_table.json",
        lambda path: json_file(path, lambda data: isinstance(data, dict) and data.get("format") == FORMAT),
    )
    # Checked before the (long) measurement; never one of the inputs.
    output = output_path(
        args.output if args.output is not None else Path(args.checkpoint).parent / "depth_table.json",
        kind,
        overwrite=args.overwrite,
        inputs=[("--checkpoint", args.checkpoint), ("--eval", args.eval_json)],
    )
    net, ckpt = load_network(args.checkpoint)
    meta = ckpt["meta"]
    rows = read_rows(args.eval_json, "eval", {"skip", "acc1", "macs"})
    try:
        configs = [SkipConfig(skip, net.num_stages) for skip in rows]
    except ValueError as error:
        raise ValueError(f"--eval {args.eval_json} is not of this checkpoint's network: {error}") from error
    device = torch.device(args.device)
    net.to(device)
    size = meta.get("image_size") or 224
    image = torch.randn(meta["in_channels"], size, size, device=device)  # content does not change the time
    latencies = measure_latencies(net, image, configs, args.batch_sizes, args.backend, args.warmup, args.repeats)
    measured = [
        {"skip": str(c), "acc1": rows[str(c)]["acc1"], "macs": rows[str(c)]["macs"], "latency_ms": lat}
        for c, lat in zip(configs, latencies)
    ]
    table = {
        "format": FORMAT,
        "version": VERSION,
        "model": meta["model"],
        "checkpoint": Path(args.checkpoint).name,
        "input": [meta["in_channels"], size, size],
        "conditions": conditions(device, args.backend, args.warmup, args.repeats),
        "batch_sizes": args.batch_sizes,
        "depths": front(measured, args.batch_sizes),
    }
    DepthTable.from_dict(table, source="the new depth table")  # what is written must read back
    atomic_write(output, lambda tmp: Path(tmp).write_text(dumps(table)))
    _print_depth_table(table, len(measured))
    print(f"depth table: {args.output or output}", file=sys.stderr)
    return 0


def _print_depth_table(table: dict, measured: int) -> None:
    c = table["conditions"]
    print(
        f"{len(table['depths'])} of {measured} depths on the Pareto front; latency ms p50/p99 over {c['repeats']} "
        f"rounds, {c['threads']} threads, {c['device']}, {c['backend']}"
    )
    sizes = table["batch_sizes"]
    print("skip  acc@1 %  MACs (M)  " + "  ".join(f"{'batch ' + str(b):>15}" for b in sizes))
    for row in reversed(table["depths"]):  # most accurate first
        cells = "  ".join(
            f"{row['latency_ms'][str(b)]['p50']:>7.3f}/{row['latency_ms'][str(b)]['p99']:<7.3f}" for b in sizes
        )
        print(f"{row['skip']:>4}  {row['acc1']:7.2f}  {row['macs'] / 1e6:8.2f}  {cells}")

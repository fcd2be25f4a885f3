"""``adn recalibrate``: measure every depth's batch-norm statistics once and store them in the checkpoint."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..utils import jsonout
from ..vision.data import DATASETS
from .common import checkpoint_dataset, positive_int


def add(sub) -> None:
    p = sub.add_parser(
        "recalibrate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="store batch-norm statistics measured at each depth in a checkpoint (used by eval, serve, export, predict)",
        description="Measure the batch-norm statistics of every sub-network on training batches run at its own depth "
                    "and store them in the checkpoint, one row per depth. From then on every command that runs a depth "
                    "(eval, predict, serve, export, depth-table, adn.load) normalizes with that depth's own statistics; "
                    "switching depth stays free. Needed above all for networks trained with --method joint, whose "
                    "intermediate depths read up to 0.8 points lower with the running statistics. Training further "
                    "(--resume, --init-from) starts from the running statistics; run this again afterwards.")
    p.add_argument("--checkpoint", required=True, help="file written by adn train (or adn import-weights)")
    p.add_argument("--output", default=None,
                   help="checkpoint to write (default: replace --checkpoint, atomically); an existing file is "
                        "replaced only if it is an adn checkpoint, or with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output that is not an adn checkpoint")
    p.add_argument("--batches", type=positive_int, default=50, metavar="N", help="training batches per depth")
    p.add_argument("-b", "--batch-size", type=positive_int, default=256, help="images per batch")
    p.add_argument("--data", default=None, choices=DATASETS, help="default: the dataset it was trained on")
    p.add_argument("--data-path", default=None, help="default: the path it was trained with")
    p.add_argument("-j", "--workers", type=int, default=0, help="data loading processes (0: in this process)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print what was stored as JSON on stdout")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..errors import CheckpointError
    from ..utils.checkpoint_file import atomic_save
    from ..utils.outputs import CHECKPOINT, output_path
    from ..vision.checkpoint import load_network
    from ..vision.data import calibration_loader
    from ..core.depth_statistics import CHECKPOINT_KEY, depth_statistics_payload, record_depth_statistics

    source = Path(args.checkpoint)
    # Checked before the measurement: a wrong --output costs nothing. In place (the default) is allowed.
    # (A --checkpoint that is missing or a folder is load_network's to explain.)
    output = source if args.output is None and not source.is_file() else output_path(
        source if args.output is None else args.output, CHECKPOINT, flag="--output" if args.output else "--checkpoint",
        overwrite=args.overwrite, inputs=[("--checkpoint", source)], in_place=True)
    shown = args.output or args.checkpoint
    before = _identity(source)
    net, ckpt = load_network(source, depth_statistics=False)  # stored rows are replaced, damaged or not
    data = checkpoint_dataset(args, ckpt["meta"])
    device = torch.device(args.device)
    net.to(device)
    batches = calibration_loader(data.train, args.batch_size, args.batches, args.workers)
    start = time.perf_counter()
    images = record_depth_statistics(net, batches, args.batches, device=device,
                                     progress=lambda config: print(f"measuring {config} ...", file=sys.stderr))
    summary = {"checkpoint": str(shown), "depths": 2 ** net.num_stages, "batches": args.batches,
               "images_per_depth": images, "seconds": round(time.perf_counter() - start, 1)}
    if images == 0:
        summary["depths"] = 0
        note = f"{ckpt['meta']['model']} has no batch norms: nothing to recalibrate; {shown} not written"
    else:
        net.to("cpu")
        if output == source.resolve() and _identity(source) != before:
            raise CheckpointError(f"{source} changed while its statistics were measured (is a training run still writing "
                                  f"it?); it was not replaced. Run adn recalibrate again once it is finished, or write "
                                  f"a copy with --output")
        atomic_save({**ckpt, CHECKPOINT_KEY: depth_statistics_payload(net)}, output, "--output")
        note = (f"stored batch-norm statistics of {summary['depths']} depths ({images} training images each, "
                f"{summary['seconds']} s) in {shown}; adn eval, predict, serve and export now use each depth's own")
    print(jsonout.dumps(summary, indent=2) if args.json else note)
    return 0


def _identity(path: Path) -> tuple | None:
    """What changes when a file is rewritten or replaced (an atomic replace gives a new inode); None for
    a missing file (load_network then says what is wrong)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns

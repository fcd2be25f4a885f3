"""``adn recalibrate``: measure every depth's batch-norm statistics once and store them in the checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..utils import jsonout
from ..vision.data import DATASETS
from ..vision.stored_statistics import BATCH_SIZE, BATCHES
from .common import positive_int


def add(sub) -> None:
    p = sub.add_parser(
        "recalibrate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="store batch-norm statistics measured at each depth in a checkpoint (used by eval, serve, export, predict)",
        description="Measure the batch-norm statistics of every sub-network on training batches run at its own depth "
        "and store them in the checkpoint, one row per depth. From then on every command that runs a depth "
        "(eval, predict, serve, export, depth-table, adn.load) normalizes with that depth's own statistics; "
        "switching depth stays free. Needed above all for networks trained with --method joint, whose "
        "intermediate depths read up to 0.8 points lower with the running statistics; adn train stores "
        "them itself at the end of such a run (its default), so this is for checkpoints without them "
        "(--no-depth-statistics, older runs, --method adn, imported weights). Training further (--resume, "
        "--init-from) starts from the running statistics; run this again afterwards unless that run "
        "stores them itself.",
    )
    p.add_argument("--checkpoint", required=True, help="file written by adn train (or adn import-weights)")
    p.add_argument(
        "--output",
        default=None,
        help="checkpoint to write (default: replace --checkpoint, atomically); an existing file is "
        "replaced only if it is an adn checkpoint, or with --overwrite",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output that is not an adn checkpoint"
    )
    p.add_argument("--batches", type=positive_int, default=BATCHES, metavar="N", help="training batches per depth")
    p.add_argument("-b", "--batch-size", type=positive_int, default=BATCH_SIZE, help="images per batch")
    p.add_argument("--data", default=None, choices=DATASETS, help="default: the dataset it was trained on")
    p.add_argument("--data-path", default=None, help="default: the path it was trained with")
    p.add_argument("-j", "--workers", type=int, default=0, help="data loading processes (0: in this process)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print what was stored as JSON on stdout")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..utils.outputs import CHECKPOINT, output_path
    from ..vision.stored_statistics import store_depth_statistics

    source = Path(args.checkpoint)
    # Checked before the measurement: a wrong --output costs nothing. In place (the default) is allowed.
    # (A --checkpoint that is missing or a folder is load_network's to explain.)
    output = (
        source
        if args.output is None and not source.is_file()
        else output_path(
            source if args.output is None else args.output,
            CHECKPOINT,
            flag="--output" if args.output else "--checkpoint",
            overwrite=args.overwrite,
            inputs=[("--checkpoint", source)],
            in_place=True,
        )
    )
    summary = store_depth_statistics(
        source,
        output,
        batches=args.batches,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        data=args.data,
        data_path=args.data_path,
        progress=lambda config: print(f"measuring {config} ...", file=sys.stderr),
    )
    summary["checkpoint"] = output = args.output or args.checkpoint  # as the user wrote it
    if summary["depths"] == 0:
        note = f"the network in {args.checkpoint} has no batch norms: nothing to recalibrate; {output} not written"
    else:
        note = (
            f"stored batch-norm statistics of {summary['depths']} depths ({summary['images_per_depth']} training "
            f"images each, {summary['seconds']} s) in {output}; adn eval, predict, serve and export now use each "
            f"depth's own"
        )
    print(jsonout.dumps(summary, indent=2) if args.json else note)
    return 0

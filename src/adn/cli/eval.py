"""``adn eval``: accuracy, params, MACs and latency of every sub-network of a checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..utils import jsonout
from ..vision.data import DATASETS
from .common import (
    add_measure_flags,
    checkpoint_dataset,
    note_missing_depth_statistics,
    plot_output,
    positive_int,
    skip_configs,
    write_plot,
)


def add(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy, params, MACs and latency of every sub-network of a checkpoint",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="file written by adn train")
    p.add_argument("--data", default=None, choices=DATASETS, help="default: the dataset it was trained on")
    p.add_argument("--data-path", default=None, help="default: the path it was trained with")
    p.add_argument("--val-subset", type=int, default=None, help="evaluate on a fixed random subset of N images")
    p.add_argument("-b", "--batch-size", type=positive_int, default=256, help="images per evaluation batch")
    p.add_argument("-j", "--workers", type=int, default=0, help="data loading processes (0: in this process)")
    p.add_argument(
        "--recalibrate-bn",
        type=positive_int,
        default=None,
        metavar="N",
        help="before evaluating each sub-network, recompute its batch-norm statistics on N batches of "
        "training images (un-augmented, the same for every depth); the checkpoint is not changed "
        "(adn recalibrate stores such statistics in it)",
    )
    p.add_argument(
        "--plot", default=None, help="accuracy-vs-MACs PNG (default: acc_vs_macs.png next to the checkpoint)"
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file adn did not write")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="imagefolder: skip unreadable image files (named on stderr, counted in the output as "
        "skipped_images) instead of stopping at the first one; accuracy is over the images read",
    )
    add_measure_flags(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..vision.checkpoint import load_network
    from ..vision.data import calibration_loader, collate_readable_pairs
    from ..core.depth_statistics import statistics_in_use
    from ..vision.evaluate import evaluate_subnetworks
    from ..deploy.report import add_ratios, plot_accuracy_vs_macs

    plot = (
        None
        if args.no_plot
        else plot_output(
            args.plot,
            Path(args.checkpoint).parent / "acc_vs_macs.png",
            args.overwrite,
            [("--checkpoint", args.checkpoint)],
        )
    )
    net, ckpt = load_network(args.checkpoint)
    meta = ckpt["meta"]
    if not args.recalibrate_bn:
        note_missing_depth_statistics(net, meta, args.checkpoint)
    configs = skip_configs(args.skip, net.num_stages)
    device = torch.device(args.device)
    net.to(device)
    data = checkpoint_dataset(args, meta, val_subset=args.val_subset, skip_bad_images=args.skip_bad_images)
    loader, example = _eval_batches(args, data)
    recalibrate = None
    if args.recalibrate_bn:
        recalibrate = (
            calibration_loader(
                data.train,
                args.batch_size,
                args.recalibrate_bn,
                args.workers,
                collate_readable_pairs if args.skip_bad_images else None,
            ),
            args.recalibrate_bn,
        )
    example = example[None].expand(args.latency_batch_size, -1, -1, -1).contiguous().to(device)
    rows = add_ratios(
        evaluate_subnetworks(
            net,
            loader,
            configs,
            example,
            device=device,
            latency=args.latency,
            warmup=args.warmup,
            repeats=args.repeats,
            backend=args.backend,
            recalibrate=recalibrate,
        )
    )
    for row in rows:
        row["recalibrated_bn_batches"] = args.recalibrate_bn or 0
        row["bn_statistics"] = (
            f"recalibrated ({args.recalibrate_bn} batches)" if args.recalibrate_bn else statistics_in_use(net)
        )
        if args.skip_bad_images:
            row["skipped_images"] = getattr(loader, "skipped", 0)
    _print_eval(args, rows, meta, data, device)
    if plot is not None:  # after the results are out: a plot that cannot be written must not lose them
        write_plot(
            lambda: plot_accuracy_vs_macs(
                rows, plot, title=f"{meta['model']}-ADN on {data.description.split(' (')[0]}"
            ),
            plot,
        )
    return 0


def _eval_batches(args, data):
    """The validation batches of ``adn eval`` and one image for latency. With --skip-bad-images the
    batches count what they skip (``loader.skipped``, reported with the results)."""
    from torch.utils.data import DataLoader

    from ..vision.data import ReadableBatches, collate_readable, eval_loader, first_readable

    loader = eval_loader(data.val, args.batch_size, args.workers, collate_readable if args.skip_bad_images else None)
    if not args.skip_bad_images or not isinstance(loader, DataLoader):  # in memory: no image files to skip
        return loader, data.val[0][0]
    return ReadableBatches(loader), first_readable(data.val)[0]


def _print_eval(args, rows: list[dict], meta: dict, data, device) -> None:
    from ..deploy.report import format_table

    if args.json:
        print(jsonout.dumps(rows, indent=2))
    else:
        skipped = rows[0].get("skipped_images", 0) if rows else 0
        count = f"{len(data.val) - skipped} of {len(data.val)}" if skipped else f"{len(data.val)}"
        print(
            f"{meta['model']} ({meta['method']}), {count} {data.description.split(' (')[0]} validation images"
            + (f" ({skipped} unreadable, skipped)" if skipped else "")
            + "; MACs per image"
            + (
                f"; latency: median of {args.repeats} runs, batch {args.latency_batch_size}, "
                f"{torch.get_num_threads()} threads, {device}, {args.backend}"
                if args.latency
                else ""
            )
            + (
                f"; batch-norm statistics recalibrated per sub-network on {args.recalibrate_bn} training batches"
                if args.recalibrate_bn
                else ""
            )
            + (
                f"; batch-norm statistics {rows[0]['bn_statistics']}"
                if rows and rows[0]["bn_statistics"].startswith("per depth")
                else ""
            )
        )
        print(format_table(rows))
    sys.stdout.flush()

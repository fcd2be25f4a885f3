"""``adn analyze``: skip-aware norm distances and Grad-CAM maps of a trained network."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..utils import jsonout
from .common import positive_int, skip_configs


def add(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="look inside a trained network: skip-aware norm distances, Grad-CAM maps",
        description="Writes norm_distance.png/.json (how far each skip-aware norm's running mean is "
        "from its twin's) and gradcam.png (Grad-CAM after each block of a stage, at the "
        "super-net and base-net depths), plus summary.json, into --output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="file written by adn train")
    p.add_argument(
        "--output",
        required=True,
        help="folder for the PNGs and summary.json (files there that adn analyze did not write are "
        "refused unless --overwrite)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace files in --output that adn analyze did not write")
    p.add_argument("--norm-distance", action="store_true", help="compute the norm-distance chart")
    p.add_argument(
        "--gradcam",
        nargs="*",
        default=None,
        metavar="IMAGE",
        help="Grad-CAM maps for these image files; with no file, the first validation images of different classes",
    )
    p.add_argument("--gradcam-count", type=positive_int, default=4, help="validation images used when no file is given")
    p.add_argument("--stage", type=int, default=-1, help="stage whose blocks Grad-CAM visualizes (0-based; -1: last)")
    p.add_argument("--skip", default="super,base", help="comma-separated depths shown in the Grad-CAM figure")
    p.set_defaults(run=run)


def load_images(paths: list[str], meta: dict) -> torch.Tensor:
    """Image files as the network's validation transform would give them (size, channels, normalization)."""
    from ..vision.preprocess import ImageError, Preprocessing

    try:
        return Preprocessing.from_meta(meta).load_files(paths)
    except ImageError as error:
        raise ValueError(f"--gradcam: {error}") from error


def run(args) -> int:
    from ..vision.analyze import (
        cam_statistics,
        first_image_per_class,
        gradcam,
        norm_distances,
        plot_gradcam,
        plot_norm_distances,
        summarize_norm_distances,
    )
    from ..utils.atomic import atomic_write
    from ..utils.outputs import PLOT, OutputKind, json_file, output_folder, output_path
    from ..vision.checkpoint import load_network

    if not args.norm_distance and args.gradcam is None:
        raise ValueError("nothing to do: give --norm-distance and/or --gradcam [IMAGE ...]")
    output = output_folder(args.output)  # the folder and every file it will get, before anything is loaded
    rows_kind = OutputKind(
        "norm distances adn analyze wrote",
        "norm_distance.json",
        lambda p: json_file(
            p, lambda d: isinstance(d, list) and all(isinstance(r, dict) and "stage_name" in r for r in d)
        ),
    )
    summary_kind = OutputKind(
        "a summary adn analyze wrote",
        "summary.json",
        lambda p: json_file(p, lambda d: isinstance(d, dict) and "checkpoint" in d),
    )
    files = [("summary.json", summary_kind)]
    if args.norm_distance:
        files += [("norm_distance.png", PLOT), ("norm_distance.json", rows_kind)]
    if args.gradcam is not None:
        files.append(("gradcam.png", PLOT))
    for name, kind in files:
        output_path(
            output / name,
            kind,
            overwrite=args.overwrite,
            inputs=[("--checkpoint", args.checkpoint), *(("--gradcam", image) for image in args.gradcam or ())],
        )
    net, ckpt = load_network(args.checkpoint)
    meta = ckpt["meta"]
    summary: dict = {"checkpoint": str(args.checkpoint)}
    if args.norm_distance:
        rows = norm_distances(net)
        plot_norm_distances({f"{meta['model']} ({meta['method']})": rows}, output / "norm_distance.png")
        atomic_write(output / "norm_distance.json", lambda tmp: Path(tmp).write_text(jsonout.dumps(rows, indent=1)))
        summary["norm_distance"] = summarize_norm_distances(rows)
        print(f"norm distances: {output / 'norm_distance.png'}, {output / 'norm_distance.json'}", file=sys.stderr)
    if args.gradcam is not None:
        if args.gradcam:
            images = load_images(args.gradcam, meta)
        else:
            from ..vision.data import load_dataset

            data = load_dataset(meta["dataset"], meta.get("data_path"), augment=False, download=False)
            images = first_image_per_class(data.val, args.gradcam_count)
        stage = args.stage % net.num_stages if -net.num_stages <= args.stage < net.num_stages else args.stage
        maps = {
            f"skip {config}": gradcam(net, images, stage, config) for config in skip_configs(args.skip, net.num_stages)
        }
        plot_gradcam(
            images,
            maps,
            output / "gradcam.png",
            mean=meta["mean"],
            std=meta["std"],
            title=f"Grad-CAM after each block of stage {stage + 1}",
        )
        summary["gradcam"] = {
            "stage": stage,
            "images": len(images),
            "hot_fraction": {k: cam_statistics(v) for k, v in maps.items()},
        }
        print(f"Grad-CAM: {output / 'gradcam.png'}", file=sys.stderr)
    atomic_write(output / "summary.json", lambda tmp: Path(tmp).write_text(jsonout.dumps(summary, indent=1)))
    print(jsonout.dumps(summary, indent=1))
    return 0

"""``adn predict``: the most probable classes of image files, at a chosen depth or latency budget."""

from __future__ import annotations

import sys
import time

from ..utils import jsonout
from ..vision.preprocess import DEFAULT_IMAGE_FORMATS
from .common import note_missing_depth_statistics, positive_int


def add(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files: top classes by name, at a chosen depth or budget",
        description="Reads image files (PNG, JPEG, WebP, BMP, TIFF; see --image-formats; converted "
        "to the checkpoint's channels, resized and center-cropped as its validation data "
        "was), runs them as one batch and prints each image's most probable classes. The "
        "depth is --skip, or the most accurate depth of the depth table whose p99 latency "
        "for that batch fits --budget-ms, or the super-net. Example: adn predict "
        "--checkpoint runs/demo/checkpoint.pt shoe.png bag.png --skip TTF --top-k 3",
    )
    p.add_argument("--checkpoint", required=True, help="file written by adn train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--skip", default=None, help="depth to run, e.g. TTF, super or base (default: super)")
    depth.add_argument(
        "--budget-ms",
        type=float,
        default=None,
        metavar="B",
        help="run the most accurate depth whose p99 latency for this batch fits B ms (reads --table)",
    )
    p.add_argument(
        "--table", default=None, help="depth table for --budget-ms (default: depth_table.json next to the checkpoint)"
    )
    p.add_argument("--top-k", type=positive_int, default=5, help="classes shown per image")
    p.add_argument(
        "--image-formats",
        default=",".join(DEFAULT_IMAGE_FORMATS).lower(),
        metavar="LIST",
        help="image formats decoded, comma-separated Pillow names; a file of any other is refused from "
        "its first bytes, before a decoder runs (eps would run Ghostscript)",
    )
    p.add_argument("--json", action="store_true", help="print JSON on stdout instead of lines")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..deploy.predict import Predictor, check_finite_outputs, depth_table_for
    from ..vision.preprocess import ImageError, image_formats
    from ..core.skip import SkipConfig

    formats = image_formats(args.image_formats)

    if args.table and args.budget_ms is None:
        raise ValueError("--table is read only with --budget-ms B; give both, or --skip S")
    if args.budget_ms is not None and not args.budget_ms > 0:
        raise ValueError(f"--budget-ms {args.budget_ms}: give a positive number of milliseconds")
    predictor = Predictor.from_checkpoint(args.checkpoint)
    note_missing_depth_statistics(predictor.net, predictor.meta, args.checkpoint)
    stages = predictor.num_stages
    choice = None
    if args.budget_ms is not None:
        table = depth_table_for(args.checkpoint, args.table, stages)
        choice = table.choose(args.budget_ms, len(args.images), "p99")
        skip = SkipConfig(choice["skip"], stages)
        if not choice["fits"]:
            print(
                f"adn: warning: no depth of the table fits {args.budget_ms:g} ms for a batch of {len(args.images)} "
                f"(p99); running the fastest, {skip} ({choice['predicted_ms']:.3f} ms predicted)",
                file=sys.stderr,
            )
    else:
        skip = SkipConfig(args.skip or "super", stages)
    try:
        batch = predictor.preprocessing.load_files(args.images, formats=formats)
    except ImageError as error:
        raise ValueError(str(error)) from error
    start = time.perf_counter()
    logits = predictor.logits(batch, skip)
    compute_ms = (time.perf_counter() - start) * 1e3
    check_finite_outputs(logits, skip, args.images, args.checkpoint)
    tops = predictor.top_k(logits, args.top_k)
    if args.json:
        print(
            jsonout.dumps(
                {
                    "skip": str(skip),
                    "compute_ms": round(compute_ms, 3),
                    "budget": choice,
                    "predictions": [{"image": path, "top": top} for path, top in zip(args.images, tops)],
                },
                indent=2,
            )
        )
        return 0
    why = (
        f"the most accurate depth of the table that fits {args.budget_ms:g} ms"
        if choice and choice["fits"]
        else "the fastest depth of the table"
        if choice
        else "given with --skip"
        if args.skip
        else "the super-net"
    )
    print(f"depth {skip} ({why}); {len(args.images)} image(s) in {compute_ms:.1f} ms")
    for path, top in zip(args.images, tops):
        print(f"{path}: " + ", ".join(f"{entry['class']} {100 * entry['probability']:.1f}%" for entry in top))
    return 0

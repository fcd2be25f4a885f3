"""``adn import-weights``: the paper's authors' published weights as an adn checkpoint."""

from __future__ import annotations

import shlex
import sys


def add(sub) -> None:
    from ..vision.authors import ARCHITECTURES, ENTRIES

    p = sub.add_parser(
        "import-weights",
        help="turn the ADN weights the paper's authors published into an adn checkpoint",
        description="Reads the authors' .pth file (weights only: no code in it runs), renames its keys "
        "to ours, checks that every key and shape fits, and writes an adn checkpoint that "
        "eval, profile --checkpoint, export, analyze and adn.load read.",
    )
    p.add_argument(
        "file",
        metavar="FILE",
        help="the authors' .pth file: a state dict, or a training file holding 'model' and/or 'model_ema'",
    )
    p.add_argument(
        "--from",
        dest="source_format",
        default="authors",
        choices=("authors",),
        help="who wrote FILE (only the paper's authors' layout so far)",
    )
    p.add_argument("--model", required=True, choices=ARCHITECTURES, help="the architecture FILE holds")
    p.add_argument(
        "--output",
        required=True,
        help="adn checkpoint to write, atomically; an existing file is replaced only if it is an adn "
        "checkpoint (or with --overwrite), and never FILE itself",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output that is not an adn checkpoint (never FILE itself)",
    )
    p.add_argument(
        "--which",
        default=None,
        choices=ENTRIES,
        help="in a training file, the state dict to import (default: model when present, else model_ema)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..utils.outputs import CHECKPOINT, output_path
    from ..vision.authors import import_authors_weights

    # Checked before anything is read: a wrong --output costs nothing and never replaces FILE.
    output = output_path(args.output, CHECKPOINT, overwrite=args.overwrite, inputs=[("FILE", args.file)])
    net = import_authors_weights(args.file, args.model, output=output, which=args.which, output_flag="--output")
    print(
        f"{args.model}-ADN with the authors' weights from {args.file} ({net.num_stages} stages, "
        f"{2**net.num_stages} sub-networks): {args.output}",
        file=sys.stderr,
    )
    print(
        f"evaluate: adn eval --checkpoint {shlex.quote(str(args.output))} --data imagefolder --data-path DIR",
        file=sys.stderr,
    )
    return 0

"""``adn reproduce-finetune``: fine-tune the reproduction's individual super-nets into adaptive depth
networks for 10/20/30% of the from-scratch epochs, and write docs/reproduction/finetune.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import positive_int, record_folder

DEFAULT_DOCS = "docs/reproduction/finetune.md"
DEFAULT_RECORD = "results/reproduction/finetune/runs"


def add(sub) -> None:
    p = sub.add_parser(
        "reproduce-finetune",
        help="fine-tune trained individual networks into adaptive ones (docs/reproduction/finetune.md)",
        description="Starts from the reproduction's individual super-depth networks (adn reproduce, arm "
        "individual-super), converts each with adn train --init-from and fine-tunes it with Algorithm 1 "
        "for fractions of the from-scratch epochs, evaluates every sub-network, and writes a report "
        "comparing them with the individual networks and ADN from scratch. Runs are cached like adn "
        "reproduce's; seeds whose individual super-net has not finished stay pending.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--runs", default="runs/finetune", help="folder for the fine-tuning checkpoints (the cache)")
    p.add_argument(
        "--docs",
        default=DEFAULT_DOCS,
        help="report to write; finished runs' result.json and log.jsonl go in <its folder>/<its name>/runs",
    )
    p.add_argument(
        "--record",
        default=None,
        help="folder for the finished runs' result.json and log.jsonl, the run records kept in version "
        f"control (default: {DEFAULT_RECORD} with the default --docs, else runs/ beside the report)",
    )
    p.add_argument(
        "--reproduce-runs", default="runs/reproduce", help="adn reproduce's --runs (the teachers' checkpoints)"
    )
    p.add_argument(
        "--reproduce-record",
        default="results/reproduction/runs",
        help="adn reproduce's record (the baselines' results)",
    )
    p.add_argument(
        "--train-teachers",
        action="store_true",
        help="train the missing individual super-nets first, into adn reproduce's folders (as adn reproduce "
        "--train-only --arms individual-super would; not while adn reproduce is running)",
    )
    p.add_argument("--quick", action="store_true", help="a few steps per run: checks the harness, not the claim")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; quick: 0 1)")
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=None,
        metavar="F",
        help="fine-tuning lengths as fractions of the from-scratch epochs (default 0.1 0.2 0.3)",
    )
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default 0.01, cosine decay)")
    p.add_argument("--data-path", default=None, help="Fashion-MNIST folder (default: the Debian package or a download)")
    p.add_argument("--device", default=None, help="training device (default: a GPU if there is one, else the CPU)")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs trained at once, one thread each")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train nothing")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..studies.finetune_report import write_finetune_report
    from ..studies.finetune_study import FinetuneRecipe, Reproduction, Study, collect, run_study
    from ..studies.reproduce import Protocol

    protocol = Protocol.quick() if args.quick else Protocol()
    protocol.data_path, protocol.device = args.data_path, args.device
    if args.seeds:
        protocol.seeds = tuple(args.seeds)
    recipe = FinetuneRecipe()
    if args.fractions:
        if not all(0 < f <= 1 for f in args.fractions):
            raise ValueError(f"--fractions must be in (0, 1], got {' '.join(map(str, args.fractions))}")
        recipe.fractions = tuple(args.fractions)
    if args.lr is not None:
        if not args.lr > 0:
            raise ValueError(f"--lr must be positive, got {args.lr}")
        recipe.lr = args.lr
    if args.train_teachers and args.report_only:
        raise ValueError("--train-teachers and --report-only exclude each other")
    docs = Path(args.docs)
    record = record_folder(args.record, args.docs, DEFAULT_DOCS, DEFAULT_RECORD)
    study = Study(
        protocol, recipe, Path(args.runs), record, Reproduction(Path(args.reproduce_runs), Path(args.reproduce_record))
    )
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if not args.report_only:
        for item in run_study(study, args.train_teachers, args.jobs, log=log, run_command=args.run_command):
            log(f"pending: no checkpoint of {item}")
    report = write_finetune_report(study, collect(study), docs, quick=args.quick)
    print(f"report: {report}")
    return 0

"""``adn reproduce-finetune``: fine-tune the reproduction's individual super-nets into adaptive depth
networks for 10/20/30% of the from-scratch epochs, and write docs/reproduction/finetune.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..studies.finetune_study import METHODS
from .common import positive_int, record_folder

# per --protocol: (report, record, fine-tuning checkpoints, the teachers' checkpoints, the baselines' record)
PAPER = (
    "docs/reproduction/finetune.md",
    "results/reproduction/finetune/runs",
    "runs/finetune",
    "runs/reproduce",
    "results/reproduction/runs",
)
DEMO = (
    "docs/reproduction/demo-finetune.md",
    "results/reproduction/demo/finetune/runs",
    "runs/finetune/demo",
    "runs/reproduce/demo",
    "results/reproduction/demo/runs",
)
DEMO_HELD_OUT = 5000  # the demo's teachers train on every image: the fine-tuning leaves these out to screen on


def add(sub) -> None:
    p = sub.add_parser(
        "reproduce-finetune",
        help="fine-tune trained individual networks into adaptive ones (docs/reproduction/finetune.md)",
        description="Starts from the reproduction's individual super-depth networks (adn reproduce, arm "
        "individual-super), converts each with adn train --init-from and fine-tunes it (Algorithm 1, or the "
        "methods of --methods) for fractions of the from-scratch epochs, evaluates every sub-network, and "
        "writes a report comparing them with the individual networks and ADN from scratch. Runs are cached "
        "like adn reproduce's; seeds whose individual super-net has not finished stay pending. --protocol "
        "demo does the same from adn reproduce --protocol demo's networks (make demo's schedule) and "
        "screens the methods on held-out images first.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--protocol",
        default="paper",
        choices=("paper", "demo"),
        help="paper: fine-tune the converged reproduction's networks (docs/reproduction.md); demo: fine-tune "
        "adn reproduce --protocol demo's networks for 20%% of make demo's 10 epochs with every method, "
        "held-out images first (the folders below change to their demo defaults)",
    )
    p.add_argument(
        "--runs",
        default=None,
        help=f"folder for the fine-tuning checkpoints, the cache (default: {PAPER[2]}; demo: {DEMO[2]})",
    )
    p.add_argument(
        "--docs",
        default=None,
        help=f"report to write (default: {PAPER[0]}; demo: {DEMO[0]}); finished runs' result.json and "
        "log.jsonl go in <its folder>/<its name>/runs unless the report is the default",
    )
    p.add_argument(
        "--record",
        default=None,
        help="folder for the finished runs' result.json and log.jsonl, the run records kept in version "
        f"control (default: {PAPER[1]}, demo: {DEMO[1]}, with the default --docs; else runs/ beside the report)",
    )
    p.add_argument(
        "--reproduce-runs",
        default=None,
        help=f"where adn reproduce keeps the teachers' checkpoints (default: {PAPER[3]}; demo: {DEMO[3]})",
    )
    p.add_argument(
        "--reproduce-record",
        default=None,
        help=f"adn reproduce's record, the baselines' results (default: {PAPER[4]}; demo: {DEMO[4]})",
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
        help="fine-tuning lengths as fractions of the from-scratch epochs (default 0.1 0.2 0.3; demo: 0.2)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=list(METHODS),
        metavar="METHOD",
        help="how the converted network is fine-tuned: "
        + "; ".join(f"{name}: adn train {' '.join(flags)}" for name, flags in METHODS.items())
        + " (default: adn; demo: all)",
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

    demo = args.protocol == "demo"
    if demo and args.quick:
        raise ValueError("--quick checks the harness with the paper protocol; leave out --protocol demo")
    protocol = Protocol.demo() if demo else Protocol.quick() if args.quick else Protocol()
    protocol.data_path, protocol.device = args.data_path, args.device
    if args.seeds:
        protocol.seeds = tuple(args.seeds)
    docs_default, record_default, runs, teachers, baselines = DEMO if demo else PAPER
    recipe = (
        FinetuneRecipe(fractions=(0.2,), methods=tuple(METHODS), val_from_train=DEMO_HELD_OUT)
        if demo
        else FinetuneRecipe()
    )
    if args.methods:
        recipe.methods = tuple(dict.fromkeys(args.methods))
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
    docs = Path(args.docs or docs_default)
    record = record_folder(args.record, str(docs), docs_default, record_default)
    study = Study(
        protocol,
        recipe,
        Path(args.runs or runs),
        record,
        Reproduction(Path(args.reproduce_runs or teachers), Path(args.reproduce_record or baselines)),
    )
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if not args.report_only:
        for item in run_study(study, args.train_teachers, args.jobs, log=log, run_command=args.run_command):
            log(f"pending: no checkpoint of {item}")
    report = write_finetune_report(study, collect(study), docs, quick=args.quick)
    print(f"report: {report}")
    return 0

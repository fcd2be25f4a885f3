"""``adn reproduce``: the paper's claims rerun at small scale, and docs/reproduction.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import positive_int, record_folder

DEFAULT_DOCS = "docs/reproduction.md"
DEFAULT_RECORD = "results/reproduction/runs"
# --protocol demo: make demo's schedule, the recipes a user chooses between (what `adn train` defaults to)
DEMO_DOCS = "docs/reproduction/demo-schedule.md"
DEMO_RECORD = "results/reproduction/demo/runs"


def add(sub) -> None:
    from ..studies.reproduce import ARMS, DEMO_ARMS

    p = sub.add_parser(
        "reproduce",
        help="rerun the paper's claims at small scale and write docs/reproduction.md",
        description="Trains every arm of the reproduction (ADN, the ablations, individual networks, "
        "pooled feature KD) for several seeds with adn train and adn eval, then writes the "
        "tables, figures and verdicts. Finished runs are cached (checkpoints in --runs; "
        "result.json and log.jsonl also in --record, kept in version control), so an "
        "interrupted reproduction continues where it stopped, on this machine or another.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--runs", default="runs/reproduce", help="folder for the runs' checkpoints (the cache)")
    p.add_argument(
        "--protocol",
        default="paper",
        choices=("paper", "demo"),
        help="paper: the converged protocol of the paper's claims (30 epochs, held-out validation); demo: "
        "make demo's schedule (10 epochs, cosine, every training image) with the recipes a user "
        f"chooses between ({', '.join(DEMO_ARMS)}), which decided adn train's default",
    )
    p.add_argument(
        "--docs",
        default=None,
        help=f"report to write; figures go in a folder beside it (default: {DEFAULT_DOCS}; "
        f"with --protocol demo {DEMO_DOCS})",
    )
    p.add_argument(
        "--record",
        default=None,
        help="folder for each finished run's result.json and log.jsonl, the run records kept in version "
        f"control (default: {DEFAULT_RECORD} with the default --docs, else runs/ beside the report)",
    )
    p.add_argument("--quick", action="store_true", help="a few steps per arm: checks the harness, not the claims")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds per arm (default 0 1 2; quick: 0 1)")
    p.add_argument(
        "--arms",
        nargs="+",
        default=None,
        choices=sorted(set(ARMS) | set(DEMO_ARMS)),
        metavar="ARM",
        help=f"train only these arms (with --train-only; the report needs all): {', '.join(ARMS)}; "
        f"with --protocol demo: {', '.join(DEMO_ARMS)}",
    )
    p.add_argument("--data-path", default=None, help="Fashion-MNIST folder (default: the Debian package or a download)")
    p.add_argument("--device", default=None, help="training device (default: a GPU if there is one, else the CPU)")
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="runs trained at once, each in its own process with one thread (2 on a 2-core machine)",
    )
    p.add_argument("--train-only", action="store_true", help="train and evaluate the arms, write no report")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train nothing")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (with --jobs 1)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..studies.demo_report import write_demo_report
    from ..studies.reproduce import Protocol, reproduce, write_report

    if args.protocol == "demo":
        if args.quick:
            raise ValueError("--quick checks the harness with the paper protocol; leave out --protocol demo")
        protocol, default_docs, default_record, writer = Protocol.demo(), DEMO_DOCS, DEMO_RECORD, write_demo_report
    else:
        protocol = Protocol.quick() if args.quick else Protocol()
        default_docs, default_record, writer = DEFAULT_DOCS, DEFAULT_RECORD, write_report
    docs = args.docs or default_docs
    unknown = sorted(set(args.arms or ()) - set(protocol.arms))
    if unknown:
        raise ValueError(
            f"--arms {' '.join(unknown)}: not an arm of --protocol {args.protocol} "
            f"(its arms: {', '.join(protocol.arms)})"
        )
    protocol.data_path = args.data_path
    protocol.device = args.device
    if args.train_only and args.report_only:
        raise ValueError("--train-only and --report-only exclude each other")
    if args.seeds:
        if len(args.seeds) < 2 and not args.train_only:
            raise ValueError(
                "--seeds needs at least 2 seeds for a report: the verdicts compare differences with the "
                "spread across seeds (or add --train-only)"
            )
        protocol.seeds = tuple(args.seeds)
    if args.arms and not args.train_only:
        raise ValueError("--arms trains part of the protocol: add --train-only (the report needs every arm)")
    record = record_folder(args.record, docs, default_docs, default_record)
    runs = Path(args.runs) / "demo" if args.protocol == "demo" else Path(args.runs)
    report = reproduce(
        protocol,
        runs,
        Path(docs),
        record=record,
        quick=args.quick,
        train_only=args.train_only,
        report_only=args.report_only,
        jobs=args.jobs,
        arms=args.arms,
        log=lambda message: print(message, file=sys.stderr, flush=True),
        run_command=args.run_command,
        report=writer,
    )
    if report:
        print(f"report: {report}")
    return 0

"""``adn pareto``: the Pareto-optimal sub-networks, and which depth fits a latency budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..utils import jsonout
from .common import plot_output, positive_int, read_rows, write_plot


def add(sub) -> None:
    p = sub.add_parser(
        "pareto",
        help="Pareto-optimal sub-networks from `adn eval --json` (and `adn profile --json`)",
        description="Reads the JSON rows of `adn eval --json` (accuracy) and optionally of "
        "`adn profile --json` (latency measured elsewhere, e.g. on the target device), "
        "prints the sub-networks no other beats on both accuracy and cost, and plots "
        "accuracy against MACs and latency.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--eval", default=None, dest="eval_json", help="file with the output of adn eval --json")
    p.add_argument(
        "--profile",
        default=None,
        dest="profile_json",
        help="file with the output of adn profile --json; its latency replaces eval's",
    )
    p.add_argument(
        "--cost",
        default=None,
        choices=("latency_ms", "macs"),
        help="cost to rank by (default: latency when measured, else MACs)",
    )
    p.add_argument("--plot", default=None, help="PNG to write (default: pareto.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file adn did not write")
    p.add_argument("--json", action="store_true", help="print the Pareto-optimal rows as JSON")
    g = p.add_argument_group("which depth for a latency budget (reads a depth table instead of --eval)")
    g.add_argument(
        "--budget-ms",
        type=float,
        default=None,
        metavar="B",
        help="print the most accurate depth whose latency at --batch-size fits B ms",
    )
    g.add_argument("--table", default=None, help="depth table written by adn depth-table")
    g.add_argument("--batch-size", type=positive_int, default=1, help="batch size the budget is for")
    g.add_argument("--quantile", default="p99", choices=("p50", "p99"), help="latency quantile that must fit")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..deploy.report import format_table, pareto_front, plot_pareto

    if args.budget_ms is not None or args.table:
        return _run_budget(args)
    if not args.eval_json:
        raise ValueError(
            "give --eval eval.json (the Pareto front), or --table depth_table.json --budget-ms B "
            "(which depth for a budget)"
        )
    plot = plot_output(
        args.plot, Path("pareto.png"), args.overwrite, [("--eval", args.eval_json), ("--profile", args.profile_json)]
    )
    rows = read_rows(args.eval_json, "eval", {"skip", "acc1", "macs"})
    if args.profile_json:
        profile = read_rows(args.profile_json, "profile", {"skip", "latency_ms"})
        unknown = sorted(set(rows) - set(profile))
        if unknown:
            raise ValueError(f"{args.profile_json} has no row for sub-network(s) {unknown} of {args.eval_json}")
        for skip, row in rows.items():
            row.update(
                {
                    k: v
                    for k, v in profile[skip].items()
                    if k.startswith("latency") or k in ("batch_size", "threads", "device")
                }
            )
    merged = list(rows.values())
    cost = args.cost or ("latency_ms" if all("latency_ms" in r for r in merged) else "macs")
    if any(cost not in r for r in merged):
        raise ValueError(f"--cost {cost}: not every row has it; give --profile or use --cost macs")
    front = pareto_front(merged, cost)
    if args.json:
        print(jsonout.dumps(front, indent=2))
    else:
        print(f"{len(front)} of {len(merged)} sub-networks are Pareto-optimal in accuracy vs {cost}:")
        print(format_table(front))
    sys.stdout.flush()
    write_plot(lambda: plot_pareto(merged, plot), plot)
    return 0


def _run_budget(args) -> int:
    """adn pareto --table T --budget-ms B: the most accurate depth that fits, or the fastest when none does."""
    from ..deploy.depth_table import DepthTable

    if not args.table or args.budget_ms is None:
        raise ValueError(
            "--budget-ms and --table go together: adn pareto --table depth_table.json --budget-ms B "
            "[--batch-size N] (write the table with adn depth-table)"
        )
    if not args.budget_ms > 0:
        raise ValueError(f"--budget-ms {args.budget_ms}: give a positive number of milliseconds")
    table = DepthTable.load(args.table)
    answer = table.choose(args.budget_ms, args.batch_size, args.quantile)
    if args.json:
        print(jsonout.dumps(answer, indent=2))
        return 0
    where = f"batch {args.batch_size}, {args.quantile}"
    if answer["fits"]:
        print(
            f"{answer['skip']}: acc@1 {answer['acc1']:.2f} %, {answer['predicted_ms']:.3f} ms ({where}) "
            f"fits {args.budget_ms:g} ms"
        )
    else:
        print(
            f"none fits {args.budget_ms:g} ms ({where}); the fastest is {answer['skip']} at "
            f"{answer['predicted_ms']:.3f} ms (acc@1 {answer['acc1']:.2f} %): raise the budget, lower the batch "
            f"size, or shed load"
        )
    return 0

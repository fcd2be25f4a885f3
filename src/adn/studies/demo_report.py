"""``docs/reproduction/demo-schedule.md``: the recipes a user chooses between, at ``make demo``'s schedule.

The converged protocol (docs/reproduction.md) answers the paper's questions; this report answers the
user's: which recipe should ``adn train`` run when no ``--method`` is given? Every arm trains the demo's
network on all training images for the demo's epochs and is measured once, on the test set, with the
network's own batch-norm statistics and with per-depth statistics measured after training (what
``adn recalibrate`` stores, and what the default recipe stores by itself at the end of training).
"""

from __future__ import annotations

from pathlib import Path

from ..utils.atomic import atomic_write
from .tables import accuracies, machine_description, time_key, mean_cell, mean_std, num_stages, verdict

TITLES = {
    "individual-super": "individual network, super-net depth",
    "individual-base": "individual network, base-net depth",
    "adn": "Algorithm 1 (the paper: `--method adn --base-ce 0`)",
    "adn-base-ce0.5": "Algorithm 1 + base-net label loss (`--method adn --base-ce 0.5`)",
    "joint": "joint training (`--method joint`, adn train's default)",
}


def depth_range(results: dict, arm: str, key: str, seeds: int) -> str:
    """The lowest and highest mean accuracy over every depth of ``arm`` (means over its seeds)."""
    runs = results.get(arm, [])
    depths = sorted({skip for run in runs for skip in run.get(key, {})})
    means = [mean_std(accuracies(results, arm, skip, key))[0] for skip in depths]
    if not means:
        return "pending"
    suffix = f" (n={len(runs)})" if len(runs) < seeds else ""
    return f"{min(means):.2f}–{max(means):.2f}{suffix}"


def demo_rows(protocol, results: dict) -> list[str]:
    """The table: per arm, the super-net, the base-net and every depth, with the networks' own statistics
    and with per-depth statistics."""
    stages = num_stages(protocol)
    sup, base = "F" * stages, "T" * stages
    seeds = len(protocol.seeds)
    lines = [
        "| recipe | statistics | super-net | base-net | every depth (lowest–highest mean) |",
        "|---|---|---|---|---|",
    ]
    for arm in protocol.arms:
        for key, label in (("accuracy", "its own"), ("accuracy_recalibrated", "per depth")):
            individual = arm.startswith("individual")
            if individual and key != "accuracy":
                continue
            depth = "" if individual else depth_range(results, arm, key, seeds)
            super_cell = mean_cell(accuracies(results, arm, sup, key), seeds) if arm != "individual-base" else ""
            base_cell = mean_cell(accuracies(results, arm, base, key), seeds) if arm != "individual-super" else ""
            lines.append(
                f"| {TITLES.get(arm, arm)} | {label if not individual else '-'} | {super_cell} | "
                f"{base_cell} | {depth} |"
            )
    return lines


def demo_verdicts(protocol, results: dict) -> list[str]:
    """Each recipe against the individual networks, with per-depth statistics (what a user gets)."""
    stages = num_stages(protocol)
    sup, base = "F" * stages, "T" * stages
    ind_sup = accuracies(results, "individual-super", sup)
    ind_base = accuracies(results, "individual-base", base)
    lines = []
    for arm in protocol.arms:
        if arm.startswith("individual"):
            continue
        arm_sup = accuracies(results, arm, sup, "accuracy_recalibrated")
        arm_base = accuracies(results, arm, base, "accuracy_recalibrated")
        lines.append(
            f"- {TITLES.get(arm, arm)}: super-net above the individual network: "
            f"**{verdict(arm_sup, ind_sup)}**; base-net above the individual network: "
            f"**{verdict(arm_base, ind_base)}**; the individual networks above it: "
            f"super-net **{verdict(ind_sup, arm_sup)}**, base-net **{verdict(ind_base, arm_base)}**."
        )
    return lines


DEPTH_SPREAD = 0.5  # the target: every depth within this many points of the super-net


def target_cells(arm_sup: list[float], arm_base: list[float], depths: list[float], ind_sup, ind_base, seeds: int):
    """The three parts of the issue's target, each a short verdict: the super-net within noise of the
    individual super-net (its lead no larger than the seeds' spread), the base-net at or above the individual
    base-net (difference of means >= 0; "below, within noise" otherwise when the spread covers it), and every
    depth's mean within :data:`DEPTH_SPREAD` points of the super-net's."""
    if min(len(arm_sup), len(arm_base), len(ind_sup), len(ind_base)) < seeds or not depths:
        return ["pending"] * 3
    (ms, ss), (mis, sis) = mean_std(arm_sup), mean_std(ind_sup)
    (mb, sb), (mib, sib) = mean_std(arm_base), mean_std(ind_base)
    sup = f"{ms - mis:+.2f}: " + ("**met**" if mis - ms <= ss + sis else "**not met**")
    if mb >= mib:
        base = f"{mb - mib:+.2f}: **met**"
    else:
        base = f"{mb - mib:+.2f}: " + ("below, within noise" if mib - mb <= sb + sib else "**not met**")
    drop = ms - min(depths)
    spread = f"{drop:.2f} below at most: " + ("**met**" if drop <= DEPTH_SPREAD else "**not met**")
    return [sup, base, spread]


def demo_targets(protocol, results: dict) -> list[str]:
    """Issue 27's target per recipe and statistics: the super-net within noise of the individual network,
    the base-net at or above it, every depth within 0.5 points of the super-net (means over every seed)."""
    stages = num_stages(protocol)
    sup, base = "F" * stages, "T" * stages
    seeds = len(protocol.seeds)
    ind_sup = accuracies(results, "individual-super", sup)
    ind_base = accuracies(results, "individual-base", base)
    lines = [
        f"| recipe | statistics | super-net vs individual (within noise) | base-net vs individual (at or above) | "
        f"every depth within {DEPTH_SPREAD} of the super-net |",
        "|---|---|---|---|---|",
    ]
    for arm in protocol.arms:
        if arm.startswith("individual"):
            continue
        for key, label in (("accuracy", "its own"), ("accuracy_recalibrated", "per depth")):
            runs = results.get(arm, [])
            skips = sorted({skip for run in runs for skip in run.get(key, {})})
            depths = [mean_std(accuracies(results, arm, skip, key))[0] for skip in skips]
            cells = target_cells(
                accuracies(results, arm, sup, key),
                accuracies(results, arm, base, key),
                depths,
                ind_sup,
                ind_base,
                seeds,
            )
            lines.append(f"| {TITLES.get(arm, arm)} | {label} | " + " | ".join(cells) + " |")
    return lines


def write_demo_report(
    protocol, results: dict, path: Path, figures: Path, root: Path, record: Path, quick: bool = False
) -> Path:
    """Write the report (the signature of the paper report's ``write_report``; ``figures``, ``root`` and
    ``quick`` are unused: this report has no figures and no quick mode)."""
    del figures, root, quick
    seeds = len(protocol.seeds)
    done = sum(len(runs) for runs in results.values())
    total = len(protocol.arms) * seeds
    finished = [r for runs in results.values() for r in runs]
    key = time_key(finished)
    cpu = key == "train_cpu_s"
    train_h = sum(r[key] for r in finished) / 3600
    lines = [
        "# Which recipe should `adn train` run? The demo's schedule, 3 seeds",
        "",
        f"Generated by `adn reproduce --protocol demo` from **{done} of {total} runs** "
        f"({len(protocol.arms)} recipes x {seeds} seeds){'' if done == total else '; the rest are pending'}; "
        f"records in `{record}`. Machine of the last report: {machine_description()}; {train_h:.2f} h of "
        f"training {'CPU time' if cpu else 'wall time'} summed over runs (two at once, one thread each).",
        "",
        f"Every run trains `{protocol.model}` (base width {protocol.width}) on all Fashion-MNIST training images "
        f"for {protocol.epochs} epochs (batch {protocol.batch_size}, SGD lr {protocol.lr} with cosine decay, "
        f"weight decay {protocol.weight_decay}: `make demo`'s schedule) and is measured once, on the 10,000 test "
        'images. "Per depth" statistics are measured after training over '
        f"{protocol.recalibrate_bn} batches of training images (`adn recalibrate`; the default recipe stores "
        "them by itself at the end of training). Cells: mean ± standard deviation over seeds.",
        "",
        *demo_rows(protocol, results),
        "",
        "Verdicts (a difference counts when it exceeds the sum of the two standard deviations):",
        "",
        *demo_verdicts(protocol, results),
        "",
        "## Issue 27's target",
        "",
        "For `adn train` without a method flag (and `make demo`): within noise of the individual networks at the "
        "super-net, at or above them at the base-net, every depth within 0.5 points of the super-net (means over "
        f'{seeds} seeds; "within noise": the difference no larger than the sum of the two standard deviations). '
        "Every recipe is checked the same way; differences are in points.",
        "",
        *demo_targets(protocol, results),
        "",
    ]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return path

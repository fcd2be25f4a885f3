"""The report of ``adn reproduce`` (docs/reproduction.md): tables, verdicts, figures and learning curves,
built from the ``result.json`` and ``log.jsonl`` of whichever runs have finished. A protocol run in parts
(over several sessions or machines) gets a report at every stage; what has not run yet reads "pending".

Verdicts compare means over seeds: a claim **holds** when the difference of means exceeds the sum of the
two standard deviations, **fails** when it is that large the other way, and is **within noise**
otherwise; with fewer than two seeds on either side it is **pending**.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
from pathlib import Path


from ..utils import jsonout
from ..utils.atomic import atomic_write
from .tables import accuracies, cell, machine_description, mean_cell, mean_std, num_stages, verdict

PLATEAU_POINTS = 0.3  # "converged": the mean validation curve moves less than this ...
PLATEAU_FRACTION = 0.2  # ... over the last 20% of the epochs


def _delta(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "pending"
    return f"{mean_std(a)[0] - mean_std(b)[0]:+.2f}"


def _macs(results: dict, skip: str) -> str:
    for runs in results.values():
        for r in runs:
            if skip in r.get("macs", {}):
                return f"{r['macs'][skip] / 1e6:.2f}"
    return "-"


# ----- learning curves -------------------------------------------------------------------------------------
def read_logs(results: dict, record: Path) -> dict[str, list[list[dict]]]:
    """Per arm, the ``log.jsonl`` records of each finished seed."""
    logs: dict[str, list[list[dict]]] = {}
    for arm, runs in results.items():
        for r in runs:
            path = record / arm / f"seed{r['seed']}" / "log.jsonl"
            if path.is_file():
                logs.setdefault(arm, []).append(
                    [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                )
    return logs


def mean_curve(per_seed: list[list[dict]], key: str) -> list[float]:
    epochs = min(len(log) for log in per_seed)
    curve = []
    for epoch in range(epochs):
        values = [log[epoch][key] for log in per_seed if key in log[epoch]]
        curve.append(statistics.fmean(values) if values else math.nan)
    return curve


def plateau(curve: list[float]) -> tuple[float, bool]:
    """How far the curve moves (max − min) over its last 20% of epochs, and whether that is below 0.3 points."""
    window = curve[-max(2, math.ceil(PLATEAU_FRACTION * len(curve))) :]
    moved = max(window) - min(window)
    return moved, moved < PLATEAU_POINTS


def curve_key(per_seed: list[list[dict]], depth: str) -> str:
    """The validation series that measures the weights: with recalibrated batch-norm statistics when the
    runs logged it (running averages lag the weights while the learning rate is high, so that series
    swings by several points from epoch to epoch; docs/evaluation.md), else with the running ones."""
    recal = f"val_acc1_{depth}_recal"
    return recal if all(recal in log[0] for log in per_seed) else f"val_acc1_{depth}"


def plot_learning_curves(logs: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..vision.analyze import save_figure

    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (arm, per_seed) in enumerate(logs.items()):
        color = f"C{index}"
        for depth, style in (("super", "-"), ("base", "--")):
            curve = mean_curve(per_seed, curve_key(per_seed, depth))
            if curve and not all(math.isnan(v) for v in curve):
                ax.plot(range(1, len(curve) + 1), curve, style, color=color, label=f"{arm} ({depth})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%), held-out images, recalibrated BN")
    ax.set_ylim(bottom=80)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


# ----- figures from checkpoints or from the saved numbers --------------------------------------------------
def norm_distance_summary(results: dict, figures: Path) -> dict:
    """Fig. 3b from the distances saved with each run: per arm (adn, joint), the mean distance at the first
    norm of a stage and at the others (stages 2 on), per seed; and the figure."""
    from ..vision.analyze import plot_norm_distances, summarize_norm_distances

    summary, mean_rows = {}, {}
    for arm in ("adn", "joint"):
        per_seed = [r["norm_distance"] for r in results.get(arm, []) if r.get("norm_distance")]
        if not per_seed:
            continue
        # The first stage's first norm sees the stem's output: identical at every depth by construction.
        summary[arm] = [summarize_norm_distances([row for row in rows if row["stage"] > 0]) for rows in per_seed]
        mean_rows[arm] = [
            dict(row, distance=statistics.fmean(rows[i]["distance"] for rows in per_seed))
            for i, row in enumerate(per_seed[0])
        ]
    if len(mean_rows) == 2:
        plot_norm_distances(
            {"ADN (specialization)": mean_rows["adn"], "joint (no specialization)": mean_rows["joint"]},
            figures / "fig3b_norm_distances.png",
            title="Running means, norm vs twin, mean over seeds (hatched: first norm of a stage)",
        )
    return summary


def gradcam_summary(results: dict, root: Path, figures: Path, seed: int, gradcam_images: int = 4) -> dict | None:
    """Fig. 4 from the checkpoints of (adn, individual-super) at ``seed`` when they are here; else the numbers
    saved the last time they were (``gradcam.json`` beside the figure); else None."""
    saved = figures / "gradcam.json"
    adn_ckpt = root / "adn" / f"seed{seed}" / "checkpoint.pt"
    ind_ckpt = root / "individual-super" / f"seed{seed}" / "checkpoint.pt"
    have_runs = any(r["seed"] == seed for r in results.get("adn", [])) and any(
        r["seed"] == seed for r in results.get("individual-super", [])
    )
    if not (have_runs and adn_ckpt.is_file() and ind_ckpt.is_file()):
        return json.loads(saved.read_text()) if saved.is_file() else None
    from ..vision.analyze import cam_statistics, first_image_per_class, gradcam, map_similarity, plot_gradcam
    from ..vision.checkpoint import load_network
    from ..vision.data import load_dataset

    net, ckpt = load_network(adn_ckpt)
    individual, _ = load_network(ind_ckpt)
    meta = ckpt["meta"]
    data = load_dataset(meta["dataset"], meta.get("data_path"), augment=False)
    images = first_image_per_class(data.val, max(gradcam_images, 16))
    stage = net.num_stages - 1
    maps = {
        "individual": gradcam(individual, images, stage, "super"),
        "ADN super-net": gradcam(net, images, stage, "super"),
        "ADN base-net": gradcam(net, images, stage, "base"),
    }
    shown = {label: [None if m is None else m[:gradcam_images] for m in value] for label, value in maps.items()}
    plot_gradcam(
        images[:gradcam_images],
        shown,
        figures / "fig4_gradcam.png",
        mean=meta["mean"],
        std=meta["std"],
        title=f"Grad-CAM after each block of stage {stage + 1} ({meta['model']}, seed {seed})",
    )
    last = {label: next(m for m in reversed(value) if m is not None) for label, value in maps.items()}
    summary = {
        "images": len(images),
        "stage": stage,
        "seed": seed,
        "hot_fraction": {label: cam_statistics(value) for label, value in maps.items()},
        "base_vs_super_final_corr": map_similarity(last["ADN base-net"], last["ADN super-net"]),
        "individual_vs_super_final_corr": map_similarity(last["individual"], last["ADN super-net"]),
    }
    atomic_write(saved, lambda tmp: Path(tmp).write_text(jsonout.dumps(summary, indent=1)))
    return summary


def plot_subnetworks(results: dict, path: Path, title: str) -> Path | None:
    """Fig. 3a: accuracy (mean ± std over seeds) of every sub-network of the ADN against its MACs, with
    the networks' own batch-norm statistics and recalibrated ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..vision.analyze import save_figure

    runs = results.get("adn")
    if not runs:
        return None
    skips = sorted(runs[0]["accuracy"], key=lambda s: runs[0]["macs"][s])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    macs = [runs[0]["macs"][s] / 1e6 for s in skips]
    for key, label, shift in (
        ("accuracy", "ADN sub-networks", 0.0),
        ("accuracy_recalibrated", "ADN, recalibrated BN", 0.03),
    ):
        stats = [mean_std(accuracies(results, "adn", s, key)) for s in skips]
        if any(not math.isnan(m) for m, _ in stats):
            ax.errorbar(
                [x + shift for x in macs],
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                fmt="o",
                capsize=3,
                label=label,
                alpha=0.8,
            )
    for skip, x in zip(skips, macs):
        ax.annotate(
            skip,
            (x, mean_std(accuracies(results, "adn", skip))[0]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    for arm, skip, marker in (
        ("individual-super", "F" * len(skips[0]), "s"),
        ("individual-base", "T" * len(skips[0]), "^"),
    ):
        values = accuracies(results, arm, skip)
        if values:
            m, s = mean_std(values)
            ax.errorbar(
                [runs[0]["macs"][skip] / 1e6],
                [m],
                yerr=[s],
                fmt=marker,
                color="tab:red",
                capsize=3,
                label=f"{arm} (trained alone)",
            )
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel("top-1 accuracy (%), test set")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ----- the report ------------------------------------------------------------------------------------------
def write_report(
    protocol, results: dict, path: Path, figures: Path, root: Path, record: Path, quick: bool = False
) -> Path:
    """``docs/reproduction.md`` from the finished runs; hand-written notes (``notes.md`` beside the figures:
    recipe choice, diagnosis) are included as they are."""
    stages = num_stages(protocol)
    n = 2**stages
    sup, base = "F" * stages, "T" * stages
    seeds = len(protocol.seeds)
    ind_sup, ind_base = accuracies(results, "individual-super", sup), accuracies(results, "individual-base", base)
    adn_sup, adn_base = accuracies(results, "adn", sup), accuracies(results, "adn", base)
    done = sum(len(runs) for runs in results.values())
    total = len(results) * seeds
    # records of resumed runs written before eval_s was timed on its own hold a negative eval_s (their
    # evaluation time was lost): count their training only
    compute = sum(r["train_s"] + max(r["eval_s"], 0.0) for runs in results.values() for r in runs)
    eval_lost = sum(r["eval_s"] < 0 for runs in results.values() for r in runs)
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    logs = read_logs(results, record)
    precision = sorted({json.dumps(r.get("speed")) for runs in results.values() for r in runs})
    lines = [
        "# Reproduction at small scale: the paper's claims on Fashion-MNIST",
        "",
        ("**QUICK MODE — a harness check with a few steps per arm; these numbers mean nothing.**\n\n" if quick else "")
        + f"Generated by `adn reproduce`{' --quick' if quick else ''} from **{done} of {total} runs** "
        f"({len(results)} arms x {seeds} seeds)"
        f"{'' if done == total else '; the rest are pending (run `make reproduce` to continue: finished runs are kept)'}. "
        f"Machine of the last report: {machine_description()}. Compute of the finished runs: "
        f"{compute / 3600:.2f} h of training and evaluation, summed over runs (`make reproduce` trains two at "
        f"once, one thread each, on 2 cores"
        f"{f'; the evaluation time of {eval_lost} resumed runs was not recorded, a minute or two each' if eval_lost else ''}"
        f"). Precision and layout of the runs: {', '.join(precision)}.",
        "",
        "## Protocol",
        "",
        f"Every arm trains `{protocol.model}` (base width {protocol.width}, {stages} stages, {n} sub-networks) on "
        f"Fashion-MNIST: {'all' if not protocol.train_subset else protocol.train_subset} training images minus "
        f"{protocol.val_from_train} held out (`--val-from-train`) for monitoring and for choosing the recipe; "
        f"{protocol.epochs} epochs, batch {protocol.batch_size}, SGD (momentum 0.9) lr {protocol.lr}, divided by 10 "
        f"after epochs {' and '.join(map(str, protocol.lr_steps))} (He et al.'s ResNet schedule, which the paper "
        f"follows), weight decay {protocol.weight_decay}, seeds {', '.join(map(str, protocol.seeds))}. Final accuracy "
        f"is measured once, on the "
        f"{'10,000-image test set' if not protocol.final_val_subset else f'{protocol.final_val_subset} test images'} "
        f"with `adn eval`, with each network's own batch-norm statistics and again with statistics recalibrated "
        f"per sub-network on {protocol.recalibrate_bn} training batches (`--recalibrate-bn`). Mean ± sample standard "
        f"deviation over seeds. A claim **holds** when the difference of means exceeds the sum of the two standard "
        f"deviations, **fails** when it is that large the other way, is **within noise** otherwise, and "
        f"**pending** before two seeds of each side have finished.",
        "",
        "Commands (seed 0; other seeds change `--seed` and the folder):",
        "",
        "```",
        *[
            "adn " + shlex.join(command)
            for arm in results
            for command in protocol.commands(arm, protocol.seeds[0], root / arm / f"seed{protocol.seeds[0]}")[:1]
        ],
        *[
            "adn " + shlex.join(command)
            for command in protocol.commands("adn", protocol.seeds[0], root / "adn" / f"seed{protocol.seeds[0]}")[1:]
        ],
        "```",
        "",
    ]
    pooled_sup = accuracies(results, "adn-pooled", sup)
    no_san_base = accuracies(results, "adn-no-san", base)
    joint_sup, joint_base = accuracies(results, "joint", sup), accuracies(results, "joint", base)
    joint_no_san_sup, joint_no_san_base = (
        accuracies(results, "joint-no-san", sup),
        accuracies(results, "joint-no-san", base),
    )

    def glance(a, b) -> str:  # "**holds** (+0.40 points)", or "**pending**" alone
        outcome = verdict(a, b)
        return f"**{outcome}**" + ("" if outcome == "pending" else f" ({_delta(a, b)} points)")

    lines += [
        "## At a glance",
        "",
        f"- Table 1, ADN super-net above the individual network: {glance(adn_sup, ind_sup)}; base-net: "
        f"{glance(adn_base, ind_base)}.",
        f"- Table 3, skip-aware norms matter under specialization (ADN base-net above the no-skip-aware-norm ADN): "
        f"{glance(adn_base, no_san_base)}.",
        f"- Spatial feature KD above pooled (super-net): {glance(adn_sup, pooled_sup)}.",
        f"- Table 3, sub-path specialization matters (ADN above the network trained jointly on the same two depths, "
        f"with skip-aware norms): super-net {glance(adn_sup, joint_sup)}; base-net {glance(adn_base, joint_base)}.",
        f"- Our recommendation for training from scratch and `adn train`'s default, a deviation from the paper: "
        f"`--method joint`, with each depth's own batch-norm statistics (which `adn train` stores at the end of the "
        f"run, as `adn recalibrate` does). Joint network against the individual "
        f"networks: super-net {glance(joint_sup, ind_sup)}; base-net {glance(joint_base, ind_base)}.",
        f"- The simpler alternative, `--method joint --no-skip-aware-norm` (no twins; running statistics serve "
        f"every depth, no per-depth statistics), against the individual networks: super-net "
        f"{glance(joint_no_san_sup, ind_sup)}; base-net {glance(joint_no_san_base, ind_base)}.",
        "",
    ]
    notes = figures / "notes.md"
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    lines += _table1(results, sup, base)
    lines += _table3(results, sup, base, ind_sup, ind_base)
    lines += _figure3a(results, figures, rel, sup, base, n, seeds)
    lines += _figure3b(results, figures, rel)
    lines += _figure4(results, root, figures, rel, protocol.seeds[0])
    lines += _feature_kd(results, sup, base)
    lines += _curves(logs, figures, rel, protocol.epochs)
    lines += [
        "",
        "## Every run",
        "",
        "| arm | seed | super-net | base-net | recalibrated super / base | train s | train CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, arm_runs in results.items():
        for r in arm_runs:
            acc, rec = r["accuracy"], r.get("accuracy_recalibrated", {})
            recal = (
                f"{rec[sup]:.2f} / {rec[base]:.2f}"
                if sup in rec and base in rec
                else (f"{next(iter(rec.values())):.2f}" if rec else "-")
            )
            lines.append(
                f"| {arm} | {r['seed']} | {cell(acc.get(sup))} | {cell(acc.get(base))} | "
                f"{recal} | {r['train_s']:.0f} | {_seconds(r.get('train_cpu_s'))} |"
            )
    lines += ["", f"Finished runs' `result.json` and `log.jsonl`: `{rel(record)}` (checkpoints stay in `{root}`).", ""]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return path


def _seconds(value: float | None) -> str:
    """A time cell; '-' for runs recorded before CPU time was measured."""
    return "-" if value is None else f"{value:.0f}"


def _table1(results, sup, base) -> list[str]:
    lines = [
        "## Table 1 counterpart: the adaptive network against networks trained alone",
        "",
        "Paper (ResNet-50, ImageNet): ADN super-net +0.9 and base-net +1.1 points over individual networks.",
        "",
        "| depth | MACs (M) | individual | ADN | ADN − individual | verdict | ADN, recalibrated BN | individual, recalibrated |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for label, skip, ind_arm in (("super-net", sup, "individual-super"), ("base-net", base, "individual-base")):
        a, b = accuracies(results, "adn", skip), accuracies(results, ind_arm, skip)
        lines.append(
            f"| {label} ({skip}) | {_macs(results, skip)} | {mean_cell(b)} | {mean_cell(a)} | {_delta(a, b)} | "
            f"{verdict(a, b)} | {mean_cell(accuracies(results, 'adn', skip, 'accuracy_recalibrated'))} | "
            f"{mean_cell(accuracies(results, ind_arm, skip, 'accuracy_recalibrated'))} |"
        )
    return lines


def _table3(results, sup, base, ind_sup, ind_base) -> list[str]:
    lines = [
        "",
        "## Table 3 counterpart: ablation of sub-path specialization and skip-aware norms",
        "",
        "Paper: only with both components do the super-net and the base-net beat the individual networks "
        "(neither: −1.5 / −2.8 points; one of the two: slightly below).",
        "",
        "| specialization | skip-aware norms | super-net | vs individual | base-net | vs individual | verdict (super / base) |",
        "|:---:|:---:|---:|---:|---:|---:|---|",
    ]
    for arm, spec, san in (("joint-no-san", "", ""), ("joint", "", "✓"), ("adn-no-san", "✓", ""), ("adn", "✓", "✓")):
        a_s, a_b = accuracies(results, arm, sup), accuracies(results, arm, base)
        lines.append(
            f"| {spec} | {san} | {mean_cell(a_s)} | {_delta(a_s, ind_sup)} | {mean_cell(a_b)} | {_delta(a_b, ind_base)} | "
            f"{verdict(a_s, ind_sup)} / {verdict(a_b, ind_base)} |"
        )
    return lines


def _figure3a(results, figures, rel, sup, base, n, seeds) -> list[str]:
    runs = results.get("adn")
    if not runs:
        return ["", "## Figure 3a counterpart: every sub-network", "", "Pending: no finished ADN run."]
    plot_subnetworks(results, figures / "fig3a_subnetworks.png", title=f"All {n} sub-networks of the ADN")
    order = sorted(runs[0]["accuracy"], key=lambda s: -runs[0]["macs"][s])
    lines = [
        "",
        "## Figure 3a counterpart: every sub-network",
        "",
        "Paper: the sub-networks never trained explicitly degrade gradually with depth; none collapses. "
        "Recalibration recomputes each sub-network's batch-norm statistics on training images before it is "
        "evaluated (the networks themselves are unchanged).",
        "",
        f"![accuracy of every sub-network]({rel(figures / 'fig3a_subnetworks.png')})",
        "",
        "| skip | trained? | MACs (M) | MACs / super | accuracy | recalibrated BN | gain |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for skip in order:
        macs = runs[0]["macs"][skip]
        plain, recal = accuracies(results, "adn", skip), accuracies(results, "adn", skip, "accuracy_recalibrated")
        lines.append(
            f"| {skip} | {'yes' if skip in (sup, base) else 'no'} | {macs / 1e6:.2f} | "
            f"{macs / runs[0]['macs'][sup]:.3f} | {mean_cell(plain)} | {mean_cell(recal)} | {_delta(recal, plain)} |"
        )
    untrained = [s for s in order if s not in (sup, base)]
    if untrained:
        worst = min(untrained, key=lambda s: mean_std(accuracies(results, "adn", s))[0])
        (w_m, w_s), (b_m, b_s) = mean_std(accuracies(results, "adn", worst)), mean_std(accuracies(results, "adn", base))
        collapsed = w_m < b_m - (b_s + w_s)
        lines += [
            "",
            f"The weakest never-trained sub-network is {worst} at {w_m:.2f}%, against {b_m:.2f}% for the "
            f"base-net, the shallowest trained one: the claim of no collapse "
            f"**{'fails' if collapsed else 'holds'}** (criterion: not below the base-net by more than the "
            f"sum of the standard deviations).",
        ]
    return lines


def _figure3b(results, figures, rel) -> list[str]:
    summary = norm_distance_summary(results, figures)
    lines = [
        "",
        "## Figure 3b counterpart: where the skip-aware norms differ",
        "",
        "Paper: the running means of a norm and its twin are close at the first layer of every stage (the "
        "previous stage's output distribution does not depend on whether it skipped) and far apart elsewhere.",
        "",
    ]
    if len(summary) < 2:
        return lines + ["Pending: needs finished adn and joint runs."]
    first = {arm: [s["first_norm_mean"] for s in summary[arm]] for arm in summary}
    other = {arm: [s["other_norms_mean"] for s in summary[arm]] for arm in summary}
    lines += [
        f"![norm distances]({rel(figures / 'fig3b_norm_distances.png')})",
        "",
        "RMS difference of running means between each skip-aware norm and its twin (stages 2 onwards; in "
        "stage 1 the first norm sees the stem's output, identical in both depths by construction):",
        "",
        "| training | first norm of a stage | other norms | other norms larger? |",
        "|---|---:|---:|---|",
    ]
    for arm, label in (("adn", "ADN (specialization)"), ("joint", "joint (no specialization)")):
        lines.append(
            f"| {label} | {mean_cell(first[arm], digits=4)} | {mean_cell(other[arm], digits=4)} | "
            f"{verdict(other[arm], first[arm])} |"
        )
    lines += [
        "",
        f"ADN's first-norm distance is smaller than joint training's: **{verdict(first['joint'], first['adn'])}**.",
    ]
    return lines


def _figure4(results, root, figures, rel, seed) -> list[str]:
    cam = gradcam_summary(results, root, figures, seed)
    lines = [
        "",
        "## Figure 4 counterpart: Grad-CAM after each block of the last stage",
        "",
        "Paper: in the ADN super-net the shared blocks have wide hot regions and the skippable blocks refine "
        "them around the object; the base-net's final map is close to the super-net's; an individual "
        "network's maps change gradually over all blocks.",
        "",
    ]
    if cam is None:
        return lines + ["Pending: needs the checkpoints of the adn and individual-super runs of the first seed."]
    fmt_hot = lambda values: ", ".join("skipped" if v is None else f"{v:.2f}" for v in values)  # noqa: E731
    return lines + [
        f"![Grad-CAM]({rel(figures / 'fig4_gradcam.png')})",
        "",
        f'Fraction of the image above half the peak ("hot"), per block, mean over {cam["images"]} test images '
        "(one per class where possible):",
        "",
        "| network | per block |",
        "|---|---|",
        *[f"| {label} | {fmt_hot(values)} |" for label, values in cam["hot_fraction"].items()],
        "",
        f"Correlation of final maps with the ADN super-net's: base-net {cam['base_vs_super_final_corr']:.3f}, "
        f"individual network {cam['individual_vs_super_final_corr']:.3f}.",
    ]


def _feature_kd(results, sup, base) -> list[str]:
    a_s, a_b = accuracies(results, "adn", sup), accuracies(results, "adn", base)
    p_s, p_b = accuracies(results, "adn-pooled", sup), accuracies(results, "adn-pooled", base)
    return [
        "",
        "## Feature distillation: spatial or pooled",
        "",
        "`--feature-kd spatial` (default: KL over channels at every position) against `pooled` (KL of the "
        "globally pooled features).",
        "",
        "| feature KD | super-net | base-net |",
        "|---|---:|---:|",
        f"| spatial | {mean_cell(a_s)} | {mean_cell(a_b)} |",
        f"| pooled | {mean_cell(p_s)} | {mean_cell(p_b)} |",
        "",
        f"spatial − pooled: super-net {_delta(a_s, p_s)} ({verdict(a_s, p_s)} that spatial is better), "
        f"base-net {_delta(a_b, p_b)} ({verdict(a_b, p_b)}).",
    ]


def _curves(logs: dict, figures: Path, rel, epochs: int) -> list[str]:
    lines = [
        "",
        "## Convergence: learning curves",
        "",
        f"Validation accuracy after each epoch on the held-out training images (mean over finished seeds), "
        f"with batch-norm statistics recalibrated on 10 training batches: the series with the running "
        f"statistics swings by several points while the learning rate is high, for reasons that have "
        f"nothing to do with the weights (see docs/evaluation.md), and would hide a plateau. An arm has "
        f"**plateaued** when its mean curve moves by less than {PLATEAU_POINTS} points over the last "
        f"{PLATEAU_FRACTION:.0%} of the epochs.",
        "",
    ]
    if not logs:
        return lines + ["Pending: no finished run."]
    plot_learning_curves(logs, figures / "learning_curves.png")
    lines += [
        f"![learning curves]({rel(figures / 'learning_curves.png')})",
        "",
        "| arm | seeds | depth | final | moved over the last 20% | plateaued? |",
        "|---|---:|---|---:|---:|---|",
    ]
    for arm, per_seed in logs.items():
        for depth in ("super", "base"):
            curve = mean_curve(per_seed, curve_key(per_seed, depth))
            if not curve or any(math.isnan(v) for v in curve):
                continue
            moved, flat = plateau(curve)
            lines.append(
                f"| {arm} | {len(per_seed)} | {depth} | {curve[-1]:.2f} | {moved:.2f} | {'yes' if flat else 'no'} |"
            )
    marks = sorted({1, *range(5, epochs + 1, 5), epochs})
    lines += [
        "",
        "Mean validation accuracy (super / base; recalibrated, and in brackets with the running statistics) "
        "at selected epochs:",
        "",
        "| arm | " + " | ".join(f"ep {e}" for e in marks) + " |",
        "|---|" + "---:|" * len(marks),
    ]
    for arm, per_seed in logs.items():
        cells = []

        def pair(key_of, per_seed=per_seed) -> list[str]:
            sup, bas = mean_curve(per_seed, key_of("super")), mean_curve(per_seed, key_of("base"))
            return [
                cell(sup[e - 1]) + ("" if math.isnan(bas[e - 1]) else f" / {cell(bas[e - 1])}")
                if e <= len(sup)
                else "-"
                for e in marks
            ]

        weights = pair(lambda depth, per_seed=per_seed: curve_key(per_seed, depth))
        running = pair(lambda depth: f"val_acc1_{depth}")
        for w, r in zip(weights, running):
            cells.append(w if w == r else f"{w} ({r})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines

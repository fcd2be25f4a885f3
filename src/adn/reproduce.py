"""``adn reproduce``: the paper's claims at a scale a CPU can run, as one resumable command.

Every arm is an ordinary ``adn train`` run followed by ``adn eval`` (the same code paths users run,
called in-process); the protocol below is the single place where the settings live. A finished run
leaves ``result.json`` next to its checkpoint and is skipped on re-run, unless its command changed.

Arms (same data, model, recipe and epochs; several seeds each):

==================  =================================================  ==========================
arm                 what                                               used by
==================  =================================================  ==========================
adn                 Algorithm 1 with skip-aware norms (the method)     Table 1, 3, Fig. 3a/3b/4
adn-no-san          specialization, but one norm for both depths       Table 3
joint               both depths trained on labels, skip-aware norms    Table 3, Fig. 3b contrast
joint-no-san        neither                                            Table 3
individual-super    a plain network of the super-net's depth           Table 1, 3, Fig. 4
individual-base     a plain network of the base-net's depth            Table 1, 3
adn-pooled          Algorithm 1 with pooled feature distillation       feature-KD comparison
==================  =================================================  ==========================
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_write

ARMS: dict[str, list[str]] = {
    "adn": ["--method", "adn"],
    "adn-no-san": ["--method", "adn", "--no-skip-aware-norm"],
    "joint": ["--method", "joint"],
    "joint-no-san": ["--method", "joint", "--no-skip-aware-norm"],
    "individual-super": ["--method", "individual", "--skip", "super"],
    "individual-base": ["--method", "individual", "--skip", "base"],
    "adn-pooled": ["--method", "adn", "--feature-kd", "pooled"],
}


@dataclass
class Protocol:
    """The settings every arm shares. The defaults are the full run (about 75-90 min on 2 CPU cores);
    :meth:`quick` is the harness check the test suite runs."""
    model: str = "resnet20"
    width: int = 8
    data: str = "fashion-mnist"
    data_path: str | None = None             # default: the Debian package or torchvision's download
    train_subset: int | None = 20000
    val_subset_during_training: int = 2000   # per-epoch monitoring only; final numbers use the whole test set
    final_val_subset: int | None = None
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    seeds: tuple[int, ...] = (0, 1, 2)
    max_steps_per_epoch: int | None = None
    extra: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls) -> "Protocol":
        return cls(train_subset=128, val_subset_during_training=64, final_val_subset=128, epochs=1,
                   batch_size=32, seeds=(0, 1), max_steps_per_epoch=2)

    def train_args(self, arm: str, seed: int, output_dir: Path) -> list[str]:
        args = ["train", "--model", self.model, "--width", str(self.width), "--data", self.data,
                "--epochs", str(self.epochs), "-b", str(self.batch_size), "--lr", str(self.lr),
                "--val-subset", str(self.val_subset_during_training), "--seed", str(seed),
                "--output-dir", str(output_dir), "--no-progress"]
        if self.data_path:
            args += ["--data-path", str(self.data_path)]
        if self.train_subset:
            args += ["--train-subset", str(self.train_subset)]
        if self.max_steps_per_epoch:
            args += ["--max-steps-per-epoch", str(self.max_steps_per_epoch)]
        return args + ARMS[arm] + list(self.extra)

    def eval_args(self, arm: str, checkpoint: Path) -> list[str]:
        skip = "all" if not arm.startswith("individual") else ARMS[arm][-1]
        args = ["eval", "--checkpoint", str(checkpoint), "--skip", skip, "--json", "--no-latency", "--no-plot"]
        if self.final_val_subset:
            args += ["--val-subset", str(self.final_val_subset)]
        return args


def command_line(args: list[str]) -> str:
    return "adn " + shlex.join(args)


def _run_cli(args: list[str]) -> str:
    """Run an ``adn`` command in this process and return what it printed on stdout."""
    from .cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    if code != 0:
        raise RuntimeError(f"`{command_line(args)}` failed with exit code {code}")
    return out.getvalue()


def run_arm(protocol: Protocol, arm: str, seed: int, root: Path, log=print) -> dict:
    """Train and evaluate one (arm, seed), or return its cached result. ``result.json`` holds the
    commands, per-sub-network accuracy, and wall time."""
    folder = root / arm / f"seed{seed}"
    train_args = protocol.train_args(arm, seed, folder)
    eval_args = protocol.eval_args(arm, folder / "checkpoint.pt")
    result_file = folder / "result.json"
    commands = [command_line(train_args), command_line(eval_args)]
    # The cache key leaves out where the runs live, so a moved results folder stays valid.
    placeholder = Path("RUNS") / arm / f"seed{seed}"
    key = [command_line(protocol.train_args(arm, seed, placeholder)),
           command_line(protocol.eval_args(arm, placeholder / "checkpoint.pt"))]
    if result_file.is_file():
        cached = json.loads(result_file.read_text())
        if cached.get("key") == key:
            return cached
        log(f"{arm} seed {seed}: settings changed since the cached run; training again")
    if folder.exists():  # a run that died before its result was written: start it afresh
        for name in ("checkpoint.pt", "log.jsonl"):
            (folder / name).unlink(missing_ok=True)
    log(f"{arm} seed {seed}: {commands[0]}")
    started = time.perf_counter()
    _run_cli(train_args)
    train_s = time.perf_counter() - started
    rows = json.loads(_run_cli(eval_args))
    result = {"arm": arm, "seed": seed, "key": key, "commands": commands, "train_s": train_s,
              "eval_s": time.perf_counter() - started - train_s,
              "accuracy": {row["skip"]: row["acc1"] for row in rows},
              "macs": {row["skip"]: row["macs"] for row in rows},
              "params": {row["skip"]: row["params"] for row in rows}}
    atomic_write(result_file, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    log(f"{arm} seed {seed}: done in {train_s + result['eval_s']:.0f}s; "
        + ", ".join(f"{k}={v:.2f}%" for k, v in result["accuracy"].items()))
    return result


def run_all(protocol: Protocol, root: Path, arms=None, log=print) -> dict[str, list[dict]]:
    """Every (arm, seed), seeds outermost: an interrupted run has all arms at the first seeds."""
    arms = list(arms or ARMS)
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in protocol.seeds:
        for arm in arms:
            results[arm].append(run_arm(protocol, arm, seed, root, log))
    return results


# ----- statistics --------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(a: list[float], b: list[float]) -> str:
    """Whether mean(a) > mean(b) is resolved at this number of seeds: "holds" when the difference of
    means exceeds the sum of the two standard deviations, "fails" when it is that far the other way,
    else "within noise"."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if ma - mb > sa + sb:
        return "holds"
    if mb - ma > sa + sb:
        return "fails"
    return "within noise"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {sys.version.split()[0]}")


# ----- analysis of the trained arms ------------------------------------------------------------------------
def _acc(results: dict, arm: str, skip: str) -> list[float]:
    return [r["accuracy"][skip] for r in results[arm]]


def _fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _delta(a: list[float], b: list[float]) -> str:
    return f"{mean_std(a)[0] - mean_std(b)[0]:+.2f}"


def analyze_runs(protocol: Protocol, results: dict, root: Path, figures: Path, gradcam_images: int = 4) -> dict:
    """Norm distances (Fig. 3b) for the adn and joint arms of every seed, Grad-CAM (Fig. 4) of seed 0,
    and the figures; returns the numbers the report quotes."""
    from .analyze import (cam_statistics, first_image_per_class, gradcam, map_similarity, norm_distances,
                          plot_gradcam, plot_norm_distances, summarize_norm_distances)
    from .checkpoint import load_network
    from .data import load_dataset

    seeds = list(protocol.seeds)
    distances = {arm: [norm_distances(load_network(root / arm / f"seed{s}" / "checkpoint.pt")[0]) for s in seeds]
                 for arm in ("adn", "joint")}

    def later_stages(rows):  # the first stage's first norm sees the stem's output: zero by construction
        return summarize_norm_distances([r for r in rows if r["stage"] > 0])

    summary = {arm: [later_stages(rows) for rows in per_seed] for arm, per_seed in distances.items()}
    mean_rows = {arm: [dict(row, distance=statistics.fmean(rows[i]["distance"] for rows in per_seed))
                       for i, row in enumerate(per_seed[0])] for arm, per_seed in distances.items()}
    plot_norm_distances({"ADN (specialization)": mean_rows["adn"], "joint (no specialization)": mean_rows["joint"]},
                        figures / "fig3b_norm_distances.png",
                        title=f"Running means, norm vs twin, mean of {len(seeds)} seeds (hatched: first norm of a stage)")

    # Grad-CAM on the last stage, on test images of different classes.
    net, ckpt = load_network(root / "adn" / f"seed{seeds[0]}" / "checkpoint.pt")
    individual, _ = load_network(root / "individual-super" / f"seed{seeds[0]}" / "checkpoint.pt")
    meta = ckpt["meta"]
    data = load_dataset(meta["dataset"], meta.get("data_path"), augment=False)
    images = first_image_per_class(data.val, max(gradcam_images, 16))
    stage = net.num_stages - 1
    maps = {"individual": gradcam(individual, images, stage, "super"),
            "ADN super-net": gradcam(net, images, stage, "super"),
            "ADN base-net": gradcam(net, images, stage, "base")}
    shown = {label: [None if m is None else m[:gradcam_images] for m in value] for label, value in maps.items()}
    plot_gradcam(images[:gradcam_images], shown, figures / "fig4_gradcam.png", mean=meta["mean"], std=meta["std"],
                 title=f"Grad-CAM after each block of stage {stage + 1} ({meta['model']}, seed {seeds[0]})")
    last = {label: next(m for m in reversed(value) if m is not None) for label, value in maps.items()}
    return {
        "norm_distance": summary,
        "gradcam": {"images": len(images), "stage": stage,
                    "hot_fraction": {label: cam_statistics(value) for label, value in maps.items()},
                    "base_vs_super_final_corr": map_similarity(last["ADN base-net"], last["ADN super-net"]),
                    "individual_vs_super_final_corr": map_similarity(last["individual"], last["ADN super-net"])},
    }


def plot_subnetworks(results: dict, path: Path, title: str) -> Path:
    """Fig. 3a: accuracy (mean ± std over seeds) of every sub-network of the ADN against its MACs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .analyze import _save
    runs = results["adn"]
    skips = sorted(runs[0]["accuracy"], key=lambda s: runs[0]["macs"][s])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    macs = [runs[0]["macs"][s] / 1e6 for s in skips]
    stats = [mean_std(_acc(results, "adn", s)) for s in skips]
    ax.errorbar(macs, [m for m, _ in stats], yerr=[s for _, s in stats], fmt="o", capsize=3, label="ADN sub-networks")
    for skip, x, (m, _) in zip(skips, macs, stats):
        ax.annotate(skip, (x, m), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for arm, skip, marker in (("individual-super", "F" * len(skips[0]), "s"), ("individual-base", "T" * len(skips[0]), "^")):
        m, s = mean_std(_acc(results, arm, skip))
        ax.errorbar([runs[0]["macs"][skip] / 1e6], [m], yerr=[s], fmt=marker, color="tab:red", capsize=3,
                    label=f"{arm} (trained alone)")
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def write_report(protocol: Protocol, results: dict, analysis: dict, path: Path, figures: Path, root: Path,
                 quick: bool = False) -> Path:
    """``docs/reproduction.md``: settings, commands, tables (mean ± std over seeds), verdicts, figures."""
    n = len(next(iter(results["adn"]))["accuracy"])  # 2^N sub-networks
    stages = n.bit_length() - 1
    sup, base = "F" * stages, "T" * stages
    seeds = len(protocol.seeds)
    ind_sup, ind_base = _acc(results, "individual-super", sup), _acc(results, "individual-base", base)
    adn_sup, adn_base = _acc(results, "adn", sup), _acc(results, "adn", base)
    wall = sum(r["train_s"] + r["eval_s"] for runs in results.values() for r in runs)
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    lines = [
        "# Reproduction at small scale: the paper's claims on Fashion-MNIST",
        "",
        ("**QUICK MODE — a harness check with a few steps per arm; these numbers mean nothing.**\n" if quick else "")
        + f"Generated by `adn reproduce` ({'--quick, ' if quick else ''}{seeds} seeds per arm). Machine: "
        f"{machine_description()}. Total compute: {wall / 60:.1f} min of training and evaluation.",
        "",
        "## Protocol",
        "",
        f"Every arm trains `{protocol.model}` (base width {protocol.width}, {stages} stages, {n} sub-networks) on "
        f"Fashion-MNIST ({protocol.train_subset or 'all 60000'} training images, a fixed subset), {protocol.epochs} "
        f"epochs, batch {protocol.batch_size}, SGD lr {protocol.lr} with cosine decay, seeds "
        f"{', '.join(map(str, protocol.seeds))}; accuracy is measured on the "
        f"{'full 10,000-image test set' if not protocol.final_val_subset else f'{protocol.final_val_subset} test images'} "
        "with `adn eval`. Mean ± sample standard deviation over seeds. A claim **holds** when the difference "
        "of means exceeds the sum of the two standard deviations, **fails** when it is that large the other "
        "way, and is **within noise** otherwise.",
        "",
        "Commands (seed 0; other seeds change `--seed` and the folder):",
        "",
        "```",
        *[results[arm][0]["commands"][0] for arm in results],
        results["adn"][0]["commands"][1],
        "```",
        "",
    ]
    # At a glance
    pooled_sup = _acc(results, "adn-pooled", sup)
    lines += [
        "## At a glance",
        "",
        f"- Table 1, ADN super-net above the individual network: **{verdict(adn_sup, ind_sup)}** "
        f"({_delta(adn_sup, ind_sup)} points); base-net: **{verdict(adn_base, ind_base)}** ({_delta(adn_base, ind_base)}).",
        f"- Table 3, skip-aware norms matter under specialization (ADN base-net above the no-skip-aware-norm ADN): "
        f"**{verdict(adn_base, _acc(results, 'adn-no-san', base))}** ({_delta(adn_base, _acc(results, 'adn-no-san', base))}).",
        f"- Spatial feature KD above pooled (super-net): **{verdict(adn_sup, pooled_sup)}** ({_delta(adn_sup, pooled_sup)}).",
        "- Figures 3a, 3b and 4: see their sections. The learning curves at the end show why the short schedule "
        "favours networks trained on labels at full weight.",
        "",
    ]
    # Table 1
    lines += [
        "## Table 1 counterpart: the adaptive network against networks trained alone",
        "",
        "Paper (ResNet-50, ImageNet): ADN super-net +0.9 and base-net +1.1 points over individual networks.",
        "",
        "| depth | MACs (M) | individual | ADN | ADN − individual | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, skip, a, b in (("super-net", sup, adn_sup, ind_sup), ("base-net", base, adn_base, ind_base)):
        macs = results["adn"][0]["macs"][skip] / 1e6
        lines.append(f"| {label} ({skip}) | {macs:.2f} | {_fmt(b)} | {_fmt(a)} | {_delta(a, b)} | {verdict(a, b)} |")
    # Table 3
    lines += [
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
        a_s, a_b = _acc(results, arm, sup), _acc(results, arm, base)
        lines.append(f"| {spec} | {san} | {_fmt(a_s)} | {_delta(a_s, ind_sup)} | {_fmt(a_b)} | {_delta(a_b, ind_base)} | "
                     f"{verdict(a_s, ind_sup)} / {verdict(a_b, ind_base)} |")
    # Fig 3a
    runs = results["adn"]
    order = sorted(runs[0]["accuracy"], key=lambda s: -runs[0]["macs"][s])
    plot_subnetworks(results, figures / "fig3a_subnetworks.png",
                     title=f"All {n} sub-networks of the ADN (mean ± std over {seeds} seeds)")
    base_m, base_s = mean_std(adn_base)
    untrained = [s for s in order if s not in (sup, base)]
    worst = min(untrained, key=lambda s: mean_std(_acc(results, "adn", s))[0]) if untrained else None
    lines += [
        "",
        "## Figure 3a counterpart: every sub-network",
        "",
        "Paper: the sub-networks never trained explicitly degrade gradually with depth; none collapses.",
        "",
        f"![accuracy of every sub-network]({rel(figures / 'fig3a_subnetworks.png')})",
        "",
        "| skip | trained? | MACs (M) | MACs / super | accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    for skip in order:
        macs = runs[0]["macs"][skip]
        lines.append(f"| {skip} | {'yes' if skip in (sup, base) else 'no'} | {macs / 1e6:.2f} | "
                     f"{macs / runs[0]['macs'][sup]:.3f} | {_fmt(_acc(results, 'adn', skip))} |")
    if worst is not None:
        w_m, w_s = mean_std(_acc(results, "adn", worst))
        collapsed = w_m < base_m - (base_s + w_s)
        lines += ["", f"The weakest never-trained sub-network is {worst} at {w_m:.2f}%, against {base_m:.2f}% for the "
                      f"base-net, the shallowest trained one: the claim of no collapse **{'fails' if collapsed else 'holds'}** "
                      f"(criterion: not below the base-net by more than the sum of the standard deviations)."]
    # Fig 3b
    nd = analysis["norm_distance"]
    first = {arm: [s["first_norm_mean"] for s in nd[arm]] for arm in nd}
    other = {arm: [s["other_norms_mean"] for s in nd[arm]] for arm in nd}
    lines += [
        "",
        "## Figure 3b counterpart: where the skip-aware norms differ",
        "",
        "Paper: the running means of a norm and its twin are close at the first layer of every stage (the previous "
        "stage's output distribution does not depend on whether it skipped) and far apart elsewhere.",
        "",
        f"![norm distances]({rel(figures / 'fig3b_norm_distances.png')})",
        "",
        "RMS difference of running means between each skip-aware norm and its twin (stages 2 onwards; in stage 1 "
        "the first norm sees the stem's output, identical in both depths by construction):",
        "",
        "| training | first norm of a stage | other norms | other norms larger? |",
        "|---|---:|---:|---|",
    ]
    for arm, label in (("adn", "ADN (specialization)"), ("joint", "joint (no specialization)")):
        lines.append(f"| {label} | {_fmt(first[arm], 4)} | {_fmt(other[arm], 4)} | "
                     f"{verdict(other[arm], first[arm])} |")
    lines += ["", f"ADN's first-norm distance is smaller than joint training's: **{verdict(first['joint'], first['adn'])}**."]
    # Fig 4
    cam = analysis["gradcam"]
    hot = cam["hot_fraction"]
    fmt_hot = lambda values: ", ".join("skipped" if v is None else f"{v:.2f}" for v in values)  # noqa: E731
    lines += [
        "",
        "## Figure 4 counterpart: Grad-CAM after each block of the last stage",
        "",
        "Paper: in the ADN super-net the shared blocks have wide hot regions and the skippable blocks refine them "
        "around the object; the base-net's final map is close to the super-net's; an individual network's maps "
        "change gradually over all blocks.",
        "",
        f"![Grad-CAM]({rel(figures / 'fig4_gradcam.png')})",
        "",
        f"Fraction of the image above half the peak (\"hot\"), per block, mean over {cam['images']} test images "
        "(one per class where possible):",
        "",
        "| network | per block |",
        "|---|---|",
        *[f"| {label} | {fmt_hot(values)} |" for label, values in hot.items()],
        "",
        f"Correlation of final maps with the ADN super-net's: base-net {cam['base_vs_super_final_corr']:.3f}, "
        f"individual network {cam['individual_vs_super_final_corr']:.3f}.",
    ]
    # Feature KD
    p_sup, p_base = _acc(results, "adn-pooled", sup), _acc(results, "adn-pooled", base)
    lines += [
        "",
        "## Feature distillation: spatial or pooled",
        "",
        "`--feature-kd spatial` (default: KL over channels at every position) against `pooled` (KL of the "
        "globally pooled features).",
        "",
        "| feature KD | super-net | base-net |",
        "|---|---:|---:|",
        f"| spatial | {_fmt(adn_sup)} | {_fmt(adn_base)} |",
        f"| pooled | {_fmt(p_sup)} | {_fmt(p_base)} |",
        "",
        f"spatial − pooled: super-net {_delta(adn_sup, p_sup)} ({verdict(adn_sup, p_sup)} that spatial is better), "
        f"base-net {_delta(adn_base, p_base)} ({verdict(adn_base, p_base)}).",
        "",
        "## Learning curves: where the gaps come from",
        "",
        "Validation accuracy after each epoch (the fixed 2,000-image monitoring subset, mean over seeds) and the "
        "super-net's training cross-entropy. In Algorithm 1 the super-net's cross-entropy is weighted by alpha = 0.5 "
        "and the base-net learns only from the super-net (no label loss), whereas an individual network gets the "
        "full cross-entropy: with a short schedule the ADN starts slower, and the base-net cannot exceed its teacher.",
        "",
        *learning_curve_table(results, root),
        "",
        "## Every run",
        "",
        "| arm | seed | super-net | base-net | train s |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm, arm_runs in results.items():
        for r in arm_runs:
            acc = r["accuracy"]
            lines.append(f"| {arm} | {r['seed']} | {acc.get(sup, float('nan')):.2f} | {acc.get(base, float('nan')):.2f} | "
                         f"{r['train_s']:.0f} |")
    lines += ["", f"Run folders (checkpoints, logs, `result.json`): `{root}`.", ""]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return path


def learning_curve_table(results: dict, root: Path) -> list[str]:
    """Markdown rows: per arm and epoch, mean val acc@1 of super and base and the super-net's train CE."""
    lines = ["| arm | epoch | super-net | base-net | train CE (super) |", "|---|---:|---:|---:|---:|"]
    for arm, runs in results.items():
        logs = []
        for r in runs:
            path = root / arm / f"seed{r['seed']}" / "log.jsonl"
            if path.is_file():
                logs.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        if not logs:
            continue
        for epoch in range(min(len(log) for log in logs)):
            rows = [log[epoch] for log in logs]

            def mean(key):
                values = [row[key] for row in rows if key in row]
                return f"{statistics.fmean(values):.2f}" if values else "-"
            ce = "train_ce_super" if "train_ce_super" in rows[0] else "train_loss"
            lines.append(f"| {arm} | {epoch + 1} | {mean('val_acc1_super')} | {mean('val_acc1_base')} | {mean(ce)} |")
    return lines


def reproduce(protocol: Protocol, root: Path, docs: Path, figures: Path | None = None, quick: bool = False,
              train_only: bool = False, log=print) -> Path | None:
    """The whole reproduction: train (or reuse) every arm, analyze, write the report."""
    results = run_all(protocol, root, log=log)
    if train_only:
        return None
    figures = figures or docs.parent / docs.stem
    analysis = analyze_runs(protocol, results, root, figures)
    atomic_write(figures / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"results": results, "analysis": analysis}, indent=1, default=float)))
    return write_report(protocol, results, analysis, docs, figures, root, quick=quick)

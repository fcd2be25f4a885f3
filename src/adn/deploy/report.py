"""Human-readable tables and the accuracy-vs-MACs plot."""

from __future__ import annotations

import os
from pathlib import Path

from ..utils.atomic import atomic_write

COLUMNS = [  # key, header, format
    ("skip", "skip", "{}"),
    ("acc1", "acc@1 %", "{:.2f}"),
    ("acc5", "acc@5 %", "{:.2f}"),
    ("params", "params (M)", "{:.3f}", 1e-6),
    ("macs", "MACs (M)", "{:.2f}", 1e-6),
    ("macs_ratio", "MACs/super", "{:.3f}"),
    ("latency_ms", "latency ms", "{:.3f}"),
    ("latency_ratio", "lat/super", "{:.3f}"),
    ("switch_us", "switch µs", "{:.0f}"),
]


def add_ratios(rows: list[dict]) -> list[dict]:
    """Add MACs and latency relative to the super-net (the row with no stage skipped), when present."""
    reference = next((r for r in rows if set(r["skip"]) == {"F"}), None)
    if reference is None:
        return rows
    for row in rows:
        row["macs_ratio"] = row["macs"] / reference["macs"]
        if "latency_ms" in row and "latency_ms" in reference:
            row["latency_ratio"] = row["latency_ms"] / reference["latency_ms"]
    return rows


def format_table(rows: list[dict]) -> str:
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    cells = [[c[1] for c in columns]]
    for row in rows:
        line = []
        for key, _header, fmt, *scale in columns:
            value = row.get(key)
            line.append("-" if value is None else fmt.format(value * scale[0] if scale else value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_accuracy_vs_macs(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Scatter of acc@1 against MACs, one labelled point per sub-network; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    macs = [r["macs"] / 1e6 for r in rows]
    accs = [r["acc1"] for r in rows]
    ax.scatter(macs, accs, color="tab:blue", zorder=3)
    for row, x, y in zip(rows, macs, accs):
        special = set(row["skip"]) == {"F"} and "super-net" or set(row["skip"]) == {"T"} and "base-net" or ""
        ax.annotate(
            row["skip"] + (f" ({special})" if special else ""),
            (x, y),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    front = pareto_front(rows, "macs")
    ax.plot(
        [r["macs"] / 1e6 for r in front],
        [r["acc1"] for r in front],
        color="tab:orange",
        lw=1,
        label="Pareto front",
        zorder=2,
    )
    ax.margins(x=0.15, y=0.1)  # room for the labels
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy of every sub-network")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=Path(path).suffix or ".png")
    finally:
        plt.close(fig)


def pareto_front(rows: list[dict], cost: str = "macs") -> list[dict]:
    """Sub-networks that no other beats on both accuracy and ``cost`` (ties count as beaten), by
    increasing cost."""
    front, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: (r[cost], -r["acc1"])):
        if row["acc1"] > best:
            front.append(row)
            best = row["acc1"]
    return front


def plot_pareto(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy against MACs and, when measured, against latency; Pareto fronts drawn; atomic write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = [("macs", "MACs per image (millions)", 1e-6)]
    if all("latency_ms" in r for r in rows):
        costs.append(("latency_ms", "latency (ms)", 1.0))
    fig, axes = plt.subplots(1, len(costs), figsize=(6.5 * len(costs), 4.5), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], costs):
        ax.scatter([r[key] * scale for r in rows], [r["acc1"] for r in rows], color="tab:blue", zorder=3)
        for row in rows:
            ax.annotate(
                row["skip"], (row[key] * scale, row["acc1"]), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
        front = pareto_front(rows, key)
        ax.plot([r[key] * scale for r in front], [r["acc1"] for r in front], color="tab:orange", label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.margins(x=0.15, y=0.1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title or "sub-networks: accuracy against cost")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=Path(path).suffix or ".png")
    finally:
        plt.close(fig)

"""What the study reports share: per-seed accuracies of an arm, their mean and spread, verdicts, table
cells, the machine line, and the protocol's stage count. One definition, so that the reproduction's and
the fine-tuning study's tables format and judge numbers the same way."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from ..convert import convert
from ..models import build_model


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(a: list[float], b: list[float]) -> str:
    """Whether mean(a) > mean(b) is resolved at this number of seeds: "holds" when the difference of the
    means exceeds the sum of the two standard deviations, "fails" the other way round, else "within noise"."""
    if len(a) < 2 or len(b) < 2:
        return "pending"
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if ma - mb > sa + sb:
        return "holds"
    if mb - ma > sa + sb:
        return "fails"
    return "within noise"


def accuracies(results: dict, arm: str, skip: str, key: str = "accuracy") -> list[float]:
    """One accuracy per finished seed of ``arm`` at depth ``skip`` (``key``: which evaluation)."""
    return [r[key][skip] for r in results.get(arm, []) if skip in r.get(key, {})]


def mean_cell(values: list[float], seeds: int = 3, digits: int = 2) -> str:
    """``mean ± std``, with ``(n=k)`` while fewer than ``seeds`` runs have finished; "pending" for none."""
    if not values:
        return "pending"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" + (f" (n={len(values)})" if len(values) < seeds else "")


def cell(value: float | None) -> str:
    """A table cell: two decimals, or "-" for a value the run does not have."""
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def num_stages(protocol) -> int:
    """Stages of the protocol's network (the number of skip flags)."""
    return convert(build_model(protocol.model, num_classes=10, in_channels=1, width=protocol.width)).num_stages


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, Python {sys.version.split()[0]}"


def time_key(runs: list[dict]) -> str:
    """``train_cpu_s`` (the training's CPU seconds) where every run has it, else wall ``train_s``: CPU time
    does not count the minutes a run waited while the machine did other work (or was paused)."""
    return "train_cpu_s" if runs and all(r.get("train_cpu_s") for r in runs) else "train_s"

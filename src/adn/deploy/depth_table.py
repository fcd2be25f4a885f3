"""The depth table: what each depth worth serving costs on this machine, and how accurate it is.

A plain JSON file (``depth_table.json`` next to the checkpoint) that a person can read and edit::

    {
      "format": "adn-depth-table", "version": 1,
      "model": "resnet20", "checkpoint": "checkpoint.pt", "input": [1, 28, 28],
      "conditions": {"device": "cpu", "cpu": "AMD EPYC ...", "threads": 2, "backend": "eager",
                     "torch": "2.14.1", "onnxruntime": null, "date": "2026-...Z",
                     "warmup": 5, "repeats": 100, "quantiles": "nearest rank"},
      "batch_sizes": [1, 8, 32, 64],
      "depths": [   # the Pareto front, least accurate (cheapest) first
        {"skip": "TTT", "acc1": 91.34, "macs": 5070000,
         "latency_ms": {"1": {"p50": 0.41, "p99": 0.62}, "8": {"p50": 1.9, "p99": 2.4}, ...}},
        ...
      ]
    }

Only ``depths`` (each with ``skip``, ``acc1`` and ``latency_ms`` for every entry of ``batch_sizes``)
and ``batch_sizes`` are needed to use a table; the rest records the conditions of the measurement.
Reading and predicting need no torch (the :class:`adn.Governor` hot path uses them); measuring does.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.skip import SkipConfig
from ..utils import jsonout

FORMAT = "adn-depth-table"
VERSION = 1
DEFAULT_BATCH_SIZES = (1, 8, 32, 64)
QUANTILES = {"p50": 0.50, "p99": 0.99}
_HOW_TO_FIX = "write one with `adn depth-table --checkpoint C --eval eval.json`, or see docs/serving.md for the schema"


class DepthTableError(ValueError):
    """A depth table that cannot be used; the message says where and what was expected."""


@dataclass
class DepthTable:
    """A validated depth table. ``depths`` are ordered least accurate first."""

    depths: list[dict]
    batch_sizes: list[int]
    meta: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DepthTable:
        try:
            data = jsonout.loads(Path(path).read_text(), source=str(path))
        except ValueError as error:  # malformed, or nested too deeply to parse
            raise DepthTableError(f"{path}: not valid JSON ({error}); {_HOW_TO_FIX}") from error
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: object, source: str = "depth table") -> DepthTable:
        if not isinstance(data, dict):
            raise DepthTableError(
                f"{source}: expected a JSON object with 'batch_sizes' and 'depths', got "
                f"{type(data).__name__}; {_HOW_TO_FIX}"
            )
        if data.get("format", FORMAT) != FORMAT or data.get("version", VERSION) != VERSION:
            raise DepthTableError(
                f"{source}: format {data.get('format')!r} version {data.get('version')!r}; this adn "
                f"reads {FORMAT!r} version {VERSION}"
            )
        batch_sizes = _batch_sizes(data.get("batch_sizes"), source)
        depths = data.get("depths")
        if not isinstance(depths, list) or not depths:
            raise DepthTableError(f"{source}: 'depths' must be a non-empty list of rows; {_HOW_TO_FIX}")
        rows = [_depth_row(row, i, batch_sizes, source) for i, row in enumerate(depths)]
        stages = {len(row["skip"]) for row in rows}
        if len(stages) > 1:
            raise DepthTableError(
                f"{source}: the skip configurations have different lengths {sorted(stages)}; "
                f"one table describes one network"
            )
        seen = [row["skip"] for row in rows]
        if len(set(seen)) != len(seen):
            raise DepthTableError(
                f"{source}: a skip configuration appears twice in 'depths' ({seen}); keep one row each"
            )
        # Least accurate first; at equal accuracy the costlier first, so that "the most accurate that fits"
        # prefers the cheaper of two equals.
        rows.sort(key=lambda row: (row["acc1"], -row["macs"] if _number(row.get("macs")) else 0))
        meta = {k: v for k, v in data.items() if k not in ("batch_sizes", "depths")}
        return cls(rows, batch_sizes, meta)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            **self.meta,
            "batch_sizes": self.batch_sizes,
            "depths": self.depths,
        }

    def index(self, skip) -> int:
        key = str(SkipConfig(skip))
        for i, row in enumerate(self.depths):
            if row["skip"] == key:
                return i
        raise ValueError(f"depth {key} is not in the depth table; it has {', '.join(r['skip'] for r in self.depths)}")

    def latency(self, index: int, batch_size: int, quantile: str = "p99") -> float:
        """Predicted latency (ms) of depth ``index`` at ``batch_size``: interpolated linearly between the
        measured batch sizes; below the smallest, the smallest's (a smaller batch is not slower); above
        the largest, the largest's time per image times ``batch_size`` (throughput no longer grows there)."""
        sizes = self.batch_sizes
        times = self.depths[index]["latency_ms"]
        if batch_size <= sizes[0]:
            return times[str(sizes[0])][quantile]
        if batch_size >= sizes[-1]:
            return times[str(sizes[-1])][quantile] * batch_size / sizes[-1]
        right = bisect.bisect_left(sizes, batch_size)
        low, high = sizes[right - 1], sizes[right]
        t_low, t_high = times[str(low)][quantile], times[str(high)][quantile]
        return t_low + (t_high - t_low) * (batch_size - low) / (high - low)

    def choose(self, budget_ms: float, batch_size: int = 1, quantile: str = "p99") -> dict:
        """The most accurate depth whose latency at ``batch_size`` fits ``budget_ms``; when none does, the
        fastest, with ``fits`` false."""
        predicted = [self.latency(i, batch_size, quantile) for i in range(len(self.depths))]
        fitting = [i for i, ms in enumerate(predicted) if ms <= budget_ms]
        index = fitting[-1] if fitting else min(range(len(predicted)), key=predicted.__getitem__)
        row = self.depths[index]
        return {
            "skip": row["skip"],
            "acc1": row["acc1"],
            "predicted_ms": predicted[index],
            "quantile": quantile,
            "batch_size": batch_size,
            "budget_ms": budget_ms,
            "fits": bool(fitting),
        }


def dumps(table: dict) -> str:
    """The table as JSON with one line per depth, so that it reads (and diffs) as a table."""

    head = jsonout.dumps({k: v for k, v in table.items() if k != "depths"}, indent=2)
    rows = ",\n".join("    " + jsonout.dumps(row) for row in table["depths"])
    return head[:-2] + ',\n  "depths": [\n' + rows + "\n  ]\n}\n"


def quantile_key(quantile: float | str) -> str:
    """'p99' for 0.99 or 'p99'; the latency column a quantile reads."""
    key = quantile if isinstance(quantile, str) else f"p{round(float(quantile) * 100)}"
    if key not in QUANTILES:
        raise ValueError(f"quantile {quantile!r}: a depth table holds {', '.join(QUANTILES)} (quantile 0.5 or 0.99)")
    return key


def _batch_sizes(value: object, source: str) -> list[int]:
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in value)
    )
    if not ok or sorted(set(value)) != value:
        raise DepthTableError(
            f"{source}: 'batch_sizes' must be a non-empty increasing list of positive integers "
            f"such as [1, 8, 32], got {value!r}"
        )
    return list(value)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _depth_row(row: object, i: int, batch_sizes: list[int], source: str) -> dict:
    where = f"{source}: depths[{i}]"
    if not isinstance(row, dict):
        raise DepthTableError(f"{where}: expected an object with 'skip', 'acc1' and 'latency_ms', got {row!r}")
    for key in ("skip", "acc1", "latency_ms"):
        if key not in row:
            raise DepthTableError(f"{where}: no {key!r}; every row needs 'skip', 'acc1' and 'latency_ms'")
    try:
        skip = str(SkipConfig(row["skip"]))
    except ValueError as error:
        raise DepthTableError(f"{where}: {error}") from error
    if not _number(row["acc1"]):
        raise DepthTableError(f"{where} ({skip}): 'acc1' must be a number (top-1 %), got {row['acc1']!r}")
    latency = row["latency_ms"]
    if not isinstance(latency, dict):
        raise DepthTableError(f"{where} ({skip}): 'latency_ms' must map batch sizes to {{'p50': ms, 'p99': ms}}")
    for size in batch_sizes:
        entry = latency.get(str(size))
        if not isinstance(entry, dict):
            raise DepthTableError(
                f"{where} ({skip}): no latency for batch size {size} (listed in 'batch_sizes'); "
                f'add "{size}": {{"p50": ms, "p99": ms}} or drop {size} from \'batch_sizes\''
            )
        for key in QUANTILES:
            if not _number(entry.get(key)) or entry[key] <= 0:
                raise DepthTableError(
                    f'{where} ({skip}): latency_ms["{size}"]["{key}"] must be a positive number '
                    f"of milliseconds, got {entry.get(key)!r}"
                )
        if entry["p99"] < entry["p50"]:
            raise DepthTableError(
                f"{where} ({skip}): at batch size {size} p99 ({entry['p99']}) is below p50 "
                f"({entry['p50']}); the 99th percentile cannot be faster than the median"
            )
    return {**row, "skip": skip}


# --- measuring (needs torch) ---------------------------------------------------------------------


def nearest_rank(sorted_times: list[float], q: float) -> float:
    """The q-quantile by nearest rank: the smallest sample with at least q of the samples at or below it.
    With fewer than 100 samples, p99 is the slowest sample."""
    return sorted_times[max(0, math.ceil(q * len(sorted_times)) - 1)]


def measure_latencies(
    net, image, configs, batch_sizes, backend: str = "eager", warmup: int = 5, repeats: int = 100
) -> list[dict]:
    """For each config: ``{str(batch_size): {"p50": ms, "p99": ms}}``, timed in interleaved rounds (one run
    of every depth per round) at each batch size. ONNX sub-networks are exported once (dynamic batch)."""
    from ..runtime.backends import depth_runners
    from ..runtime.profile import time_interleaved

    if backend not in ("eager", "onnxruntime", "onnxruntime-per-depth"):
        raise ValueError(
            f"--backend {backend}: a depth table is measured on eager or onnxruntime (a compiled graph "
            f"is specialised to one batch size)"
        )
    net.eval()
    runners, _ = depth_runners(net, image[None], configs, backend)
    tables: list[dict] = [{} for _ in configs]
    for size in batch_sizes:
        batch = image[None].expand(size, *image.shape).contiguous()
        inputs = batch.numpy() if backend.startswith("onnxruntime") else batch
        times = time_interleaved(runners, inputs, warmup, repeats, batch.is_cuda)
        for table, samples in zip(tables, times):
            samples = sorted(samples)
            table[str(size)] = {key: round(nearest_rank(samples, q), 4) for key, q in QUANTILES.items()}
    return tables


def front(rows: list[dict], batch_sizes: list[int]) -> list[dict]:
    """Rows on the accuracy-vs-latency Pareto front at some batch size and quantile: a depth that is
    dominated everywhere is never the best choice, one that wins anywhere may be."""
    from .report import pareto_front

    keep: set[str] = set()
    for size in batch_sizes:
        for key in QUANTILES:
            ranked = [{"skip": r["skip"], "acc1": r["acc1"], "cost": r["latency_ms"][str(size)][key]} for r in rows]
            keep.update(r["skip"] for r in pareto_front(ranked, "cost"))
    return sorted((r for r in rows if r["skip"] in keep), key=lambda r: (r["acc1"], -r["macs"]))


def conditions(device, backend: str, warmup: int, repeats: int) -> dict:
    import datetime
    import platform

    import torch

    onnx_version = None
    if backend.startswith("onnxruntime"):
        import onnxruntime

        onnx_version = onnxruntime.__version__
    return {
        "device": str(device),
        "cpu": _cpu_name() or platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "backend": backend,
        "torch": torch.__version__,
        "onnxruntime": onnx_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "warmup": warmup,
        "repeats": repeats,
        "quantiles": "nearest rank of the repeats",
    }


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None

"""The language-model depth table: how fast each depth decodes on this machine, and how accurate it is; and
choosing the most accurate depth that decodes fast enough (``adn generate --tokens-per-s T``).

The image side's depth table (:mod:`adn.deploy.depth_table`) predicts a batch's latency; a language model
is used one token at a time, so this one records decoding throughput per depth (greedy, KV cache, batch 1)
next to held-out perplexity: what ``adn eval-lm --save-json FILE`` writes, or its ``--json`` rows on
stdout (a plain list) redirected to a file::

    {"format": "adn-lm-depth-table", "version": 1,
     "setting": "... held-out perplexity over 8192 tokens ..., 1 threads",
     "conditions": {"threads": 1, "dtype": "float32", "torch": "2.14.1", "cpu": "AMD EPYC ...", ...},
     "rows": [{"skip": "FFFF", "layers": "30/30", "params": 134.5, "ppl": 7.39, "tokens_per_s": 18.2, ...},
              {"skip": "TTTT", ...}, ...]}

Only ``rows`` with ``skip``, ``ppl`` and ``tokens_per_s`` are needed to choose; the rest records how the
numbers were measured. Accuracy is perplexity (lower is better). Like the image table, this module needs no
torch: choosing costs microseconds. (It lives in :mod:`adn.lm`, below :mod:`adn.deploy`, which the
language-model code may not import.)
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from ..core.skip import SkipConfig
from ..utils import jsonout

FORMAT = "adn-lm-depth-table"
VERSION = 1
_HOW_TO_FIX = "write one with `adn eval-lm [--checkpoint C] --save-json FILE` (speed measured: without --no-speed)"


class LMDepthTableError(ValueError):
    """A language-model depth table that cannot be used, or a speed no depth in it reaches; the message says
    what and what to do."""


@dataclass
class LMDepthTable:
    """A validated table; ``rows`` are ordered fastest (least accurate, mostly) first."""

    rows: list[dict]
    meta: dict = field(default_factory=dict)
    source: str = "depth table"

    @classmethod
    def load(cls, path: str | os.PathLike) -> LMDepthTable:
        try:
            data = jsonout.loads(Path(path).read_text(encoding="utf-8"), source=str(path))
        except OSError as error:
            raise LMDepthTableError(f"{path}: cannot be read ({error.strerror or error}); {_HOW_TO_FIX}") from error
        except ValueError as error:
            raise LMDepthTableError(f"{path}: not valid JSON ({error}); {_HOW_TO_FIX}") from error
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: object, source: str = "depth table") -> LMDepthTable:
        """From ``eval-lm --save-json``'s object or ``eval-lm --json``'s list of rows."""
        meta: dict = {}
        if isinstance(data, dict):
            if data.get("format", FORMAT) != FORMAT or data.get("version", VERSION) != VERSION:
                raise LMDepthTableError(
                    f"{source}: format {data.get('format')!r} version {data.get('version')!r}; "
                    f"this adn reads {FORMAT!r} version {VERSION} (an image depth table is "
                    f"for adn serve / adn.Governor)"
                )
            meta = {k: v for k, v in data.items() if k != "rows"}
            data = data.get("rows")
        if not isinstance(data, list) or not data:
            raise LMDepthTableError(
                f"{source}: expected a non-empty list of rows (or an object with 'rows'); {_HOW_TO_FIX}"
            )
        rows = [_row(row, i, source) for i, row in enumerate(data)]
        lengths = {len(row["skip"]) for row in rows}
        if len(lengths) > 1:
            raise LMDepthTableError(
                f"{source}: the skip configurations have different lengths {sorted(lengths)}; "
                f"one table describes one network"
            )
        skips = [row["skip"] for row in rows]
        if len(set(skips)) != len(skips):
            raise LMDepthTableError(f"{source}: a depth appears twice ({', '.join(skips)}); keep one row each")
        rows.sort(key=lambda row: (-row["tokens_per_s"], row["ppl"]))
        return cls(rows, meta, source)

    @property
    def num_stages(self) -> int:
        return len(self.rows[0]["skip"])

    def fastest(self) -> dict:
        return self.rows[0]

    def front(self) -> list[dict]:
        """The rows no other row beats on both speed and perplexity, fastest first."""
        kept, best_ppl = [], math.inf
        for row in self.rows:  # fastest first: a row is on the front when it beats every faster row's ppl
            if row["ppl"] < best_ppl:
                kept.append(row)
                best_ppl = row["ppl"]
        return kept

    def choose(self, tokens_per_s: float) -> dict:
        """The most accurate row (lowest perplexity; the faster on a tie) whose measured decoding speed is at
        least ``tokens_per_s``; :class:`LMDepthTableError` naming the fastest measured when none is."""
        if not (isinstance(tokens_per_s, (int, float)) and tokens_per_s > 0 and math.isfinite(tokens_per_s)):
            raise LMDepthTableError(f"the speed asked for must be a positive number of tokens/s, got {tokens_per_s!r}")
        meeting = [row for row in self.rows if row["tokens_per_s"] >= tokens_per_s]
        if not meeting:
            fastest = self.fastest()
            threads = (
                self.meta.get("conditions", {}).get("threads")
                if isinstance(self.meta.get("conditions"), dict)
                else None
            )
            measured = f" with {threads} thread(s)" if threads else ""
            raise LMDepthTableError(
                f"no depth in {self.source} decodes at {tokens_per_s:g} tokens/s: the fastest measured{measured} is "
                f"{fastest['skip']} at {fastest['tokens_per_s']:.1f} tokens/s (perplexity {fastest['ppl']:.3f}). "
                f"Ask for {math.floor(fastest['tokens_per_s'] * 10) / 10:g} tokens/s or less, or measure the table "
                f"again with more threads (adn eval-lm --threads N --save-json FILE)"
            )
        return min(meeting, key=lambda row: (row["ppl"], -row["tokens_per_s"]))


def conditions(dtype: str, model: str, **measure) -> dict:
    """How a table was measured: threads, weights' dtype, the CPU, torch, the date, and ``measure``."""
    import torch  # (only when a table is written: reading and choosing need no torch)

    return {
        "model": model,
        "device": "cpu",
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "decoding": "greedy, KV cache, batch 1, prefill not counted",
        **measure,
    }


def cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _row(row: object, i: int, source: str) -> dict:
    where = f"{source}: row {i}"
    if not isinstance(row, dict):
        raise LMDepthTableError(f"{where} is not an object with skip, ppl and tokens_per_s")
    skip = row.get("skip")
    try:
        skip = str(SkipConfig(skip)) if isinstance(skip, str) else None
    except ValueError:
        skip = None
    if skip is None:
        raise LMDepthTableError(f"{where}: 'skip' must be a depth such as TTFF, got {row.get('skip')!r}")
    for key in ("ppl", "tokens_per_s"):
        value = row.get(key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)):
            hint = " (the table was written with --no-speed?)" if key == "tokens_per_s" and value is None else ""
            raise LMDepthTableError(
                f"{where} ({skip}): {key!r} must be a positive number, got {value!r}{hint}; {_HOW_TO_FIX}"
            )
    return {**row, "skip": skip}

"""Choosing a depth at run time so that each forward pass makes its deadline.

    gov = adn.Governor("runs/demo/depth_table.json", budget_ms=20)
    decision = gov.select(batch_size=len(x))          # slack_ms: time left, default the budget
    if not decision.fits: ...                         # even the fastest depth is predicted late: shed or queue
    start = time.perf_counter()
    y = net(x, skip=decision.skip)
    gov.observe(decision.skip, len(x), time.perf_counter() - start)

Prediction: the depth table's latency at the batch size (interpolated) and quantile, times one
correction factor learnt online. Pure Python, no torch: a selection costs microseconds.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

from .depth_table import DepthTable, quantile_key
from ..core.skip import SkipConfig

_LOG2 = math.log(2)


@dataclass(frozen=True)
class Decision:
    """What :meth:`Governor.select` chose. ``fits`` is false when not even the fastest depth is
    predicted to make the slack: ``skip`` is then the fastest, and the caller may run it anyway, shed
    the batch or queue it."""

    skip: SkipConfig
    predicted_ms: float  # corrected prediction at the governor's quantile
    fits: bool
    slack_ms: float
    acc1: float


class Governor:
    """Picks, for each batch, the most accurate depth of a depth table whose predicted latency fits
    the time left; learns from observed times how far the table is off.

    * Correction: one *global* factor, an exponentially weighted geometric mean of observed time over
      the table's median (p50) for the depth and batch size observed. Interference and a slower
      machine slow every depth about alike, so what one depth shows applies to all at once; a per-depth
      factor would never learn that a slowdown ended for a depth it stopped running, and would never go
      back up. Each observation moves the factor by at most a factor 2^alpha (its log-ratio to the
      current factor is clipped to +-log 2), so one stall cannot swing it far (the tail is what the
      table's p99 already covers), while a machine 3x slower is still learnt within a few more steps.
    * No evidence, no belief: a selection where nothing fits, with no observation since the previous
      selection, counts as an observation of the table's median (the factor moves toward 1 by
      ``alpha``). A caller that sheds every batch observes nothing; without this the governor would keep
      predicting a past slowdown and never let anything run again. With it, the fastest depth fits
      again after a few shed batches, runs, and its time is observed: a probe.
    * Hysteresis: a shallower depth is taken at once when the current one no longer fits (the deadline
      comes first); a deeper one only when it fits with ``up_margin`` to spare and after ``min_dwell``
      selections at the current depth, so noise around a boundary does not flap the depth.
    * Thread-safe: ``select`` and ``observe`` take a lock.
    """

    def __init__(
        self,
        table: DepthTable | dict | str | os.PathLike,
        budget_ms: float,
        quantile: float | str = 0.99,
        *,
        alpha: float = 0.2,
        up_margin: float = 0.1,
        min_dwell: int = 5,
    ):
        if isinstance(table, (str, os.PathLike)):
            table = DepthTable.load(table)
        elif isinstance(table, dict):
            table = DepthTable.from_dict(table)
        if not isinstance(table, DepthTable):
            raise TypeError(f"table must be a DepthTable, its JSON (dict) or a path, got {type(table).__name__}")
        if not (isinstance(budget_ms, (int, float)) and budget_ms > 0 and math.isfinite(budget_ms)):
            raise ValueError(f"budget_ms must be a positive number of milliseconds, got {budget_ms!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha (weight of each new observation) must be in (0, 1], got {alpha!r}")
        if up_margin < 0 or min_dwell < 0:
            raise ValueError(f"up_margin and min_dwell must be >= 0, got {up_margin!r} and {min_dwell!r}")
        self.table = table
        self.budget_ms = float(budget_ms)
        self.quantile = quantile_key(quantile)
        self.alpha, self.up_margin, self.min_dwell = alpha, up_margin, min_dwell
        self._skips = [SkipConfig(row["skip"]) for row in table.depths]
        self._index = {str(s): i for i, s in enumerate(self._skips)}
        self._cache: dict[int, tuple[list[float], list[float]]] = {}  # batch size -> (quantile, p50) per depth
        self._lock = threading.Lock()
        self._log_factor = 0.0
        self._observed = True  # the first selection has nothing to forget
        self._current = len(self._skips) - 1  # start at the most accurate depth; the first select corrects it
        self._dwell = min_dwell  # free to move at the first selection

    @property
    def factor(self) -> float:
        """Observed time / table median, smoothed: 1.0 on the machine and load the table was measured on."""
        return math.exp(self._log_factor)

    def predict_ms(self, skip, batch_size: int) -> float:
        """Corrected latency of ``skip`` at ``batch_size``, at the governor's quantile."""
        return self._predictions(batch_size)[0][self._position(skip)] * self.factor

    def fastest_median_ms(self, batch_size: int) -> float:
        """Corrected median latency of the fastest depth at ``batch_size``: the least a batch can cost now
        (a queue uses it to estimate how long the requests waiting behind a batch will take at best)."""
        return min(self._predictions(batch_size)[1]) * self.factor

    def select(self, batch_size: int = 1, slack_ms: float | None = None) -> Decision:
        """The depth to run this batch at; see :class:`Decision`."""
        slack = self.budget_ms if slack_ms is None else slack_ms
        base, _ = self._predictions(batch_size)
        with self._lock:
            factor = math.exp(self._log_factor)
            if not self._observed and min(base) * factor > slack:  # shedding: nothing was run, nothing learnt
                self._log_factor *= 1 - self.alpha
                factor = math.exp(self._log_factor)
            self._observed = False
            chosen, fits = self._choose(base, factor, slack)
            if chosen != self._current:
                self._current, self._dwell = chosen, 0
            else:
                self._dwell += 1
        return Decision(self._skips[chosen], base[chosen] * factor, fits, slack, self.table.depths[chosen]["acc1"])

    def observe(self, skip, batch_size: int, seconds: float) -> None:
        """Record that a batch of ``batch_size`` at depth ``skip`` took ``seconds`` (wall time)."""
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"seconds must be a positive wall time, got {seconds!r}")
        median = self._predictions(batch_size)[1][self._position(skip)]
        log_ratio = math.log(seconds * 1e3 / median)
        with self._lock:
            surprise = min(_LOG2, max(-_LOG2, log_ratio - self._log_factor))
            self._log_factor += self.alpha * surprise
            self._observed = True

    def _choose(self, base: list[float], factor: float, slack: float) -> tuple[int, bool]:
        """Index of the depth to run and whether it fits; called under the lock."""
        fitting = [i for i, ms in enumerate(base) if ms * factor <= slack]
        if not fitting:
            return min(range(len(base)), key=base.__getitem__), False
        best, current = fitting[-1], self._current
        if best < current or current not in fitting:
            return best, True  # the current depth would be late (or is less accurate than needed): move now
        if best == current or self._dwell < self.min_dwell:
            return current, True
        roomy = [i for i in fitting if i > current and base[i] * factor * (1 + self.up_margin) <= slack]
        return (roomy[-1] if roomy else current), True

    def _position(self, skip) -> int:
        position = self._index.get(str(skip) if isinstance(skip, (str, SkipConfig)) else str(SkipConfig(skip)))
        if position is None:
            raise ValueError(f"depth {skip} is not in the depth table; it has {', '.join(self._index)}")
        return position

    def _predictions(self, batch_size: int) -> tuple[list[float], list[float]]:
        cached = self._cache.get(batch_size)
        if cached is None:
            if not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
            n = range(len(self._skips))
            cached = (
                [self.table.latency(i, batch_size, self.quantile) for i in n],
                [self.table.latency(i, batch_size, "p50") for i in n],
            )
            if len(self._cache) < 4096:  # bounded: batch sizes come from the caller
                self._cache[batch_size] = cached
        return cached

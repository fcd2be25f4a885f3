"""The serving policy: when a batch leaves the queue, which requests it holds, and at which depth it runs.

It holds no clock and no thread: it is asked "given this queue, at this time, what now?" and answers a
:class:`Plan` to run or the time to ask again. The server's worker asks it with the real clock; the tests
ask it on a simulated one, with simulated arrivals and forward-pass times.

* Requests that fixed their depth are batched only with requests that fixed the same depth; the others
  (the governor chooses) only with each other. The oldest request's group goes first (FIFO), taking
  later requests of the same group, in order, up to ``max_batch`` images.
* A batch leaves at once unless waiting for the next request is expected to pay (``adaptive``, the
  default): the worker asks only when it is free, so a batch that waits holds an idle worker, and every
  request in it pays the wait. Requests that arrive while the worker is busy batch by themselves: they
  are all queued when it comes back. Waiting pays when the next request is expected (at the recent
  arrival rate) sooner than what running it in the same batch saves (see :meth:`BatchPolicy.waiting_pays`);
  then ``max_wait_s`` bounds the wait. Nothing else may be queued: waiting would delay it too. With
  ``adaptive=False`` every batch that is not full waits ``max_wait_s`` (the rule before). Either way a
  batch leaves when it is full, or when waiting any longer would leave too little time for the most
  accurate depth to make the earliest deadline in it: waiting for a fuller batch never costs depth.
* The governor picks the depth of a governed batch from the time left before that earliest deadline (the
  oldest request's, unless a later one brought a tighter budget), less what the governed requests
  queued *behind* the batch need: each of them must still make its deadline if, after this batch, they
  run in full batches, in order, at the fastest depth (its median time). Without that, a backlog is
  served greedily: every batch runs as deep as its own deadline allows and the queue behind it grows
  late. The requests about to arrive count too: as many images as arrived in one budget, on average over
  the last few budgets, are assumed to arrive now, due one budget from now (headroom; a batch cannot be
  stopped once it runs, so a deep batch started just before a burst makes the burst late). When nothing
  fits it runs the fastest depth anyway: the answer is late, not lost. Every batch's forward-pass time,
  fixed depths included, goes back to the governor (for depths in its table), so it learns how fast the
  machine is now.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..deploy.governor import Decision, Governor

GOVERNOR, REQUEST = "governor", "request"  # who chose a batch's depth


@dataclass(eq=False)
class Pending:
    """A request waiting in the queue. Times are seconds on the policy's clock."""

    images: int
    skip: str | None  # the depth the request fixed ("TTF"), or None: the governor chooses
    arrival: float  # when it arrived (its budget runs from here)
    deadline: float  # arrival + its budget
    queued: float  # when it entered the queue (after decoding)
    payload: Any = field(default=None, repr=False)  # what the server carries along (images, the waiting caller)
    seen: bool = field(default=False, repr=False)  # counted in the policy's arrival rate


@dataclass
class Plan:
    """A batch to run now."""

    requests: list[Pending]
    skip: str
    chosen_by: str  # GOVERNOR or REQUEST
    decision: Decision | None  # the governor's, for governed batches
    slack_ms: float  # time left before the earliest deadline when it left the queue

    @property
    def images(self) -> int:
        return sum(r.images for r in self.requests)


RATE_WINDOW_BUDGETS = 4  # the arrival rate is measured over this many budgets


class BatchPolicy:
    def __init__(
        self, governor: Governor, max_batch: int, max_wait_s: float, headroom: bool = True, adaptive: bool = True
    ):
        """``headroom``: keep room for the requests expected within one budget (off: plan only what is queued).
        ``adaptive``: a batch waits for company only while that is expected to pay, at most ``max_wait_s``
        (off: every batch that is not full waits ``max_wait_s``)."""
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch} and {max_wait_s}")
        self.governor, self.max_batch, self.max_wait_s, self.headroom = governor, max_batch, max_wait_s, headroom
        self.adaptive = adaptive
        self._table_skips = {row["skip"] for row in governor.table.depths}
        self._most_accurate = governor.table.depths[-1]["skip"]
        self._arrivals: deque[tuple[float, int]] = deque()  # (arrival, images) within the rate window
        self._arrived_images = 0  # their images, summed

    def expected_images(self, now: float) -> int:
        """Images expected to arrive within one budget: those that arrived in the last RATE_WINDOW_BUDGETS
        budgets, divided by RATE_WINDOW_BUDGETS (rounded up)."""
        self._forget_before(now - self._rate_window_s)
        return math.ceil(self._arrived_images / RATE_WINDOW_BUDGETS)

    @property
    def _rate_window_s(self) -> float:
        return RATE_WINDOW_BUDGETS * self.governor.budget_ms / 1e3

    def _forget_before(self, start: float) -> None:
        while self._arrivals and self._arrivals[0][0] < start:
            self._arrived_images -= self._arrivals.popleft()[1]

    def waiting_pays(self, queue: Sequence[Pending], taken: list[Pending], images: int, now: float) -> bool:
        """Whether holding this batch (``taken``, ``images`` images) for the next request is expected to
        lower the latency summed over its requests and that next one.

        The next request is expected one mean gap ``g`` from now (arrivals taken as Poisson at the rate of
        the last RATE_WINDOW_BUDGETS budgets: memoryless, so however long the batch has waited already, the
        next arrival is still ``g`` away), with the mean images per request, ``m``. With ``k`` requests of
        ``n`` images in the batch and ``c(b)`` the predicted time of a batch of ``b`` images:

        * leave now: the batch takes ``c(n)``; the next request, arriving while it runs (``g < c(n)``, or
          waiting could not pay), waits for it, then takes ``c(m)``: latencies ``k c(n) + c(n) - g + c(m)``;
        * wait: the ``k`` requests wait ``g``, then all run together: ``k g + (k + 1) c(n + m)``.

        Waiting wins iff ``g < c(m) / (k + 1) - (c(n + m) - c(n))``: the batch the next request would have
        had to itself, shared by all, less what the bigger batch costs each. On a CPU, where a batch costs
        about the sum of its images, that is almost never (ResNet-20, 1 thread: ``c(1) = 1.0`` ms, ``c(2) =
        1.33``: ``g < 0.17`` ms); on a GPU, where a few more images are nearly free, it holds while requests
        come faster than about ``c(1) / (k + 1)``. It assumes the next request would otherwise run alone,
        which overrates waiting when requests queue behind a busy worker anyway; ``max_wait_s`` bounds that.
        A closed-loop client (the next request only after this answer) never makes it wait: its gap
        includes the batch's own time."""
        if len(taken) < len(queue):
            return False  # others are queued: waiting would delay requests that are here already
        self._forget_before(now - self._rate_window_s)
        if len(self._arrivals) < 2:
            return False  # no stream to expect anything from
        gap_s = self._rate_window_s / len(self._arrivals)
        per_request = max(1, round(self._arrived_images / len(self._arrivals)))
        if images + per_request > self.max_batch:
            return False  # the next request would not fit in this batch
        depth = self._most_accurate if taken[0].skip is None else taken[0].skip

        def cost_ms(size: int) -> float:
            if depth in self._table_skips:
                return self.governor.predict_ms(depth, size)
            return self.governor.fastest_median_ms(size)  # a depth the table does not time: the fastest's shape

        saving_ms = cost_ms(per_request) / (len(taken) + 1) - (cost_ms(images + per_request) - cost_ms(images))
        return gap_s * 1e3 < saving_ms

    def _count_arrivals(self, queue: Sequence[Pending]) -> None:
        for request in queue:
            if not request.seen:
                request.seen = True
                self._arrivals.append((request.arrival, request.images))
                self._arrived_images += request.images

    def next(self, queue: Sequence[Pending], now: float, flush: bool = False) -> Plan | float:
        """The batch to run now, or the time at which to ask again (sooner if a request arrives).
        ``flush``: do not wait for fuller batches (the server is shutting down)."""
        if not queue:
            raise ValueError("next() needs a non-empty queue")
        self._count_arrivals(queue)
        head = queue[0]
        taken, images, full = [], 0, False
        for request in queue:
            if request.skip != head.skip:
                continue  # another depth's request: never in the same batch
            if taken and images + request.images > self.max_batch:
                full = True
                break
            taken.append(request)
            images += request.images
        full = full or images >= self.max_batch
        deadline = min(r.deadline for r in taken)
        if not (full or flush) and (not self.adaptive or self.waiting_pays(queue, taken, images, now)):
            leave_at = head.queued + self.max_wait_s
            deepest = self._most_accurate if head.skip is None else head.skip
            if deepest in self._table_skips:
                leave_at = min(leave_at, deadline - self.governor.predict_ms(deepest, images) / 1e3)
            if now < leave_at:
                return leave_at
        slack_ms = (deadline - now) * 1e3
        if head.skip is not None:
            return Plan(taken, head.skip, REQUEST, None, slack_ms)
        allowed_ms = min(slack_ms, self._backlog_allows_ms(queue, taken, now))
        decision = self.governor.select(images, slack_ms=allowed_ms)
        return Plan(taken, str(decision.skip), GOVERNOR, decision, slack_ms)

    def _backlog_allows_ms(self, queue: Sequence[Pending], taken: list[Pending], now: float) -> float:
        """The longest this batch may take so that every governed request queued behind it, and those
        expected within one budget (due one budget from now), can still make their deadlines at the fastest
        depth (inf with nothing behind it and nothing expected)."""
        in_batch = {id(request) for request in taken}
        behind = [r for r in queue if r.skip is None and id(r) not in in_batch]
        expected = self.expected_images(now) if self.headroom else 0
        due = now + self.governor.budget_ms / 1e3
        while expected > 0:  # in batches of at most max_batch, as they would run
            behind.append(Pending(min(expected, self.max_batch), None, now, due, now))
            expected -= self.max_batch
        allowed, elapsed_ms = math.inf, 0.0
        for images, earliest in self._batches(behind):
            elapsed_ms += self.governor.fastest_median_ms(images)
            allowed = min(allowed, (earliest - now) * 1e3 - elapsed_ms)
        return allowed

    def _batches(self, requests: list[Pending]):
        """(images, earliest deadline) of the batches ``requests`` would form, in order, at most max_batch each."""
        images, earliest = 0, math.inf
        for request in requests:
            if images and images + request.images > self.max_batch:
                yield images, earliest
                images, earliest = 0, math.inf
            images += request.images
            earliest = min(earliest, request.deadline)
        if images:
            yield images, earliest

    def finished(self, plan: Plan, seconds: float) -> None:
        """Tell the governor how long ``plan``'s forward pass took (depths outside its table teach it nothing)."""
        if plan.skip in self._table_skips and seconds > 0:
            self.governor.observe(plan.skip, plan.images, seconds)

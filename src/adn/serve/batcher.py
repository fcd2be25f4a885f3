"""The dynamic batching queue: requests in, batches out, one worker thread.

The event loop submits :class:`~adn.serve.policy.Pending` requests; the worker thread asks the policy
when to form which batch and hands it to ``execute`` (which runs it and answers its requests). The
worker asks only when it is free, so the policy knows that a batch it holds back holds an idle worker;
the requests that arrive while a batch runs are all in the queue when the worker asks again. The
forward pass runs in the worker, outside any lock, so the event loop keeps accepting requests while a
batch runs (torch releases the GIL in its kernels).

Nothing can leave a request unanswered: if ``execute`` raises, ``fail`` answers every request of that
batch; if the policy raises, the request at the head of the queue is failed and the queue moves on.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from .policy import BatchPolicy, Pending, Plan


class QueueFull(Exception):
    """The queue holds ``max_queue`` images already: the server is overloaded."""


class Draining(Exception):
    """The server is shutting down and takes no new requests."""


class Batcher:
    def __init__(
        self,
        policy: BatchPolicy,
        execute: Callable[[Plan], None],
        fail: Callable[[list[Pending], BaseException], None],
        max_queue: int,
        clock: Callable[[], float] = time.perf_counter,
        on_change: Callable[[int, int], None] | None = None,
    ):
        self.policy, self._execute, self._fail = policy, execute, fail
        self.max_queue, self.clock = max_queue, clock
        self._on_change = on_change or (lambda requests, images: None)
        self._queue: list[Pending] = []
        self._images = 0
        self._cond = threading.Condition()
        self._draining = self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def draining(self) -> bool:
        return self._draining

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="adn-serve-batcher", daemon=True)
            self._thread.start()

    def submit(self, request: Pending) -> None:
        """Queue ``request``; raises :class:`Draining` or :class:`QueueFull` instead when it cannot be taken."""
        with self._cond:
            if self._draining:
                raise Draining("the server is shutting down")
            if self._images + request.images > self.max_queue:
                raise QueueFull(f"{self._images} images are queued (limit {self.max_queue})")
            self._queue.append(request)
            self._images += request.images
            self._cond.notify()
            self._on_change(len(self._queue), self._images)

    def begin_drain(self) -> None:
        """Take no new requests, and run the queued ones without waiting for fuller batches."""
        with self._cond:
            self._draining = True
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Answer every queued request, then stop the worker (waits up to ``timeout`` seconds for it)."""
        with self._cond:
            self._draining = self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            plan = self._next_plan()
            if plan is None:
                return
            try:
                self._execute(plan)
            except BaseException as error:  # noqa: BLE001 - whatever happened, the batch's callers get an answer
                self._fail(plan.requests, error)

    def _next_plan(self) -> Plan | None:
        """Block until a batch should run; None once closed with nothing left."""
        with self._cond:
            while True:
                if not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                now = self.clock()
                try:
                    result = self.policy.next(self._queue, now, flush=self._draining)
                except Exception as error:  # noqa: BLE001 - a policy bug must not wedge the queue
                    print(
                        f"adn serve: the batching policy failed ({type(error).__name__}: {error}); failing the "
                        f"oldest request",
                        file=sys.stderr,
                    )
                    head = self._queue[0]
                    self._remove([head])
                    self._fail([head], error)
                    continue
                if isinstance(result, Plan):
                    self._remove(result.requests)
                    return result
                self._cond.wait(timeout=max(0.0, result - now))

    def _remove(self, requests: list[Pending]) -> None:
        chosen = {id(r) for r in requests}
        self._queue = [r for r in self._queue if id(r) not in chosen]
        self._images -= sum(r.images for r in requests)
        self._on_change(len(self._queue), self._images)

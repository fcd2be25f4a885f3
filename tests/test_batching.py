"""When a batch leaves the queue, on fake clocks: an idle server sends a lone request at once (the issue's
low-load case: waiting for company that is not coming was two thirds of the server's time); requests that
arrive together, or while the worker is busy, still go out as one batch (up to max_batch); a batch waits
for the next request, at most --max-wait-ms, only while requests come faster than batching them saves."""

from __future__ import annotations

import queue
import threading
import time

import pytest

import adn

pytest.importorskip("starlette", reason="the batcher is part of the serve extra (pip install 'adn[serve]')")
from adn.serve import BatchPolicy, Pending, Plan  # noqa: E402
from adn.serve.batcher import Batcher

from .test_serve import SIM_ACC, SIM_P50, sim_table


def table_with(batch_of_8: float) -> dict:
    """sim_table's times at batch 1, a batch of 8 costing ``batch_of_8`` times as much (p99: 1.2x p50)."""

    def cell(ms: float) -> dict:
        return {"p50": ms, "p99": 1.2 * ms}

    return {
        "batch_sizes": [1, 8],
        "depths": [
            {"skip": s, "acc1": SIM_ACC[s], "macs": 1, "latency_ms": {"1": cell(one), "8": cell(batch_of_8 * one)}}
            for s, (one, _) in SIM_P50.items()
        ],
    }


def gpu_table() -> dict:
    """Times like a GPU's: a batch of 8 costs 1.2x a batch of 1."""
    return table_with(1.2)


def linear_table() -> dict:
    """A batch costs the sum of its images (as ResNet-50 on one CPU core)."""
    return table_with(8.0)


def request(at: float, budget_ms: float = 50, skip: str | None = None) -> Pending:
    return Pending(1, skip, at, at + budget_ms / 1e3, at)


def stream(policy: BatchPolicy, interval_s: float, count: int) -> float:
    """Let the policy see ``count`` requests, one every ``interval_s`` (its arrival rate); returns the last time."""
    for i in range(count):
        policy.next([request(i * interval_s)], i * interval_s)
    return (count - 1) * interval_s


# ----- the policy ------------------------------------------------------------------------------------------
def test_a_lone_request_on_an_idle_server_leaves_at_once():
    lone = request(0.0, budget_ms=1000)
    assert isinstance(BatchPolicy(adn.Governor(sim_table(), 1000), 8, 0.005).next([lone], 0.0), Plan)


@pytest.mark.parametrize("table", [sim_table(), gpu_table(), linear_table()], ids=["sim", "gpu-like", "linear"])
def test_a_sequential_client_never_waits(table):
    """One client, each request sent 1 ms after the previous answer (its 0.5 ms of decoding included): the
    arrival rate is high, but the next request cannot come before this one is answered, and its gap
    includes this batch's own time, which is more than waiting could save. Every batch leaves at once."""
    policy = BatchPolicy(adn.Governor(table, 20), 8, 0.005)
    truth = adn.DepthTable.from_dict(table)
    t = 0.0
    for _ in range(200):
        sent = Pending(1, None, t, t + 0.020, t + 0.0005)
        plan = policy.next([sent], sent.queued)
        assert isinstance(plan, Plan), f"a lone request waited until {plan:.4f} s (queued at {sent.queued:.4f} s)"
        seconds = truth.latency(truth.index(plan.skip), 1, "p50") / 1e3
        policy.finished(plan, seconds)
        t = sent.queued + seconds + 0.001


def test_requests_that_arrive_together_go_out_as_one_batch_up_to_max_batch():
    policy = BatchPolicy(adn.Governor(sim_table(), 50), 4, 0.005)
    burst = [request(0.0) for _ in range(6)]
    first = policy.next(burst, 0.0)
    assert isinstance(first, Plan) and first.requests == burst[:4]
    second = policy.next(burst[4:], 0.0)  # the rest: nothing else is coming at the rate seen
    assert isinstance(second, Plan) and second.requests == burst[4:]


def test_a_batch_waits_only_while_requests_come_faster_than_batching_saves():
    """2,000 requests/s. On a GPU-like table a batch of 8 costs little more than a batch of 1, so a lone
    request waits for the next ones (at most --max-wait-ms, never past what its deadline allows) and the
    batch leaves once company no longer pays; where a batch costs the sum of its images nothing waits. A
    request of another depth group already queued is never made to wait."""
    gpu = BatchPolicy(adn.Governor(gpu_table(), 50), 8, 0.005)
    t = stream(gpu, 0.0005, 200) + 0.0005
    assert gpu.next([request(t)], t) == pytest.approx(t + 0.005)  # waits, at most max_wait
    tight = request(t, budget_ms=8)  # FFF's p99 at batch 1 is 4.8 ms: leave by 3.2 ms
    assert gpu.next([tight], t) == pytest.approx(t + 0.0032)
    company = [request(t + i * 0.0005) for i in range(6)]
    assert isinstance(gpu.next(company, t + 0.0025), Plan)  # 6 together: one more would not pay its wait
    assert isinstance(gpu.next([request(t), request(t, skip="TTT")], t), Plan)  # TTT must not wait for FFF's
    assert isinstance(gpu.next([request(t)], t + 0.005), Plan)  # the max wait is up

    linear = BatchPolicy(adn.Governor(linear_table(), 50), 8, 0.005)
    t = stream(linear, 0.0005, 200) + 0.0005
    assert isinstance(linear.next([request(t)], t), Plan)


def test_the_fixed_rule_still_waits_max_wait():
    """--batch-wait fixed: the rule before, every batch that is not full waits --max-wait-ms."""
    policy = BatchPolicy(adn.Governor(sim_table(), 1000), 8, 0.005, adaptive=False)
    assert policy.next([request(0.0, budget_ms=1000)], 0.0) == pytest.approx(0.005)


# ----- the batcher: a worker thread, on a clock that stands still ---------------------------------------------
class StillClock:
    """Time does not pass: a batch that waits for the clock to reach some time never leaves."""

    def __call__(self) -> float:
        return 1.0


def make_batcher(policy: BatchPolicy, execute) -> Batcher:
    def fail(requests, error):
        raise AssertionError(f"a batch failed: {error!r}")

    batcher = Batcher(policy, execute, fail, max_queue=64, clock=StillClock())
    batcher.start()
    return batcher


def test_an_idle_worker_runs_a_lone_request_without_waiting():
    ran: queue.Queue[Plan] = queue.Queue()
    batcher = make_batcher(BatchPolicy(adn.Governor(sim_table(), 20), 8, 0.005), ran.put)
    try:
        lone = request(1.0, budget_ms=20)
        batcher.submit(lone)
        try:
            plan = ran.get(timeout=5)
        except queue.Empty:
            pytest.fail("the idle worker held a lone request, waiting for company")
        assert plan.requests == [lone]
    finally:
        batcher.close(timeout=5)


def test_requests_that_arrive_while_the_worker_is_busy_go_out_together():
    ran: queue.Queue[Plan] = queue.Queue()
    busy, release = threading.Event(), threading.Event()

    def execute(plan: Plan) -> None:
        if not busy.is_set():  # the first batch holds the worker until the others are queued
            busy.set()
            assert release.wait(10)
        ran.put(plan)

    batcher = make_batcher(BatchPolicy(adn.Governor(sim_table(), 50), 4, 0.005), execute)
    try:
        first = request(1.0)
        batcher.submit(first)
        assert busy.wait(5)
        behind = [request(1.0) for _ in range(6)]
        for waiting in behind:
            batcher.submit(waiting)
        time.sleep(0.05)  # the worker is busy: nothing may leave meanwhile
        assert ran.empty() and len(batcher) == 6
        release.set()
        plans = [ran.get(timeout=5) for _ in range(3)]
        assert [p.requests for p in plans] == [[first], behind[:4], behind[4:]]
    finally:
        release.set()
        batcher.close(timeout=5)

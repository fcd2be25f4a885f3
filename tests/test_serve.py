"""adn serve: the batching and governor policy on a simulated clock, then the real server (uvicorn on a
free loopback port) with a tiny network: answers against the network itself, depths never mixed, bad
input, failures, metrics, and a graceful SIGTERM that answers what is queued."""

from __future__ import annotations

import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from PIL import Image  # noqa: E402

import adn  # noqa: E402
from adn.cli import main  # noqa: E402
from adn.serve import BatchPolicy, Pending, Plan, ServeSettings, Service, create_app  # noqa: E402
from adn.serve import server as adn_server  # noqa: E402
from adn.serve.errors import ApiError  # noqa: E402

# ----- the policy on a simulated clock -------------------------------------------------------------------------
# p50 at batch 1 and batch 8 (ms); p99 is 1.5 x p50. The simulated machine takes the p50 times the slowdown.
SIM_P50 = {"TTT": (1.0, 3.0), "TTF": (2.0, 6.0), "FFF": (4.0, 12.0)}
SIM_ACC = {"TTT": 80.0, "TTF": 85.0, "FFF": 90.0}


def sim_table() -> dict:
    return {
        "batch_sizes": [1, 8],
        "depths": [
            {
                "skip": s,
                "acc1": SIM_ACC[s],
                "macs": 1,
                "latency_ms": {"1": {"p50": one, "p99": 1.5 * one}, "8": {"p50": eight, "p99": 1.5 * eight}},
            }
            for s, (one, eight) in SIM_P50.items()
        ],
    }


def simulate(
    policy: BatchPolicy,
    requests: list[Pending],
    slowdown=lambda t: 1.0,
    table: dict | None = None,
    starts: dict | None = None,
) -> list[tuple[Pending, Plan, float]]:
    """One worker on a simulated clock: (request, the plan it ran in, when it was answered) per request.
    The machine takes the p50 of ``table`` (default: sim_table()) times the slowdown. ``starts``, if
    given, gets when each plan started (by id)."""
    truth = adn.DepthTable.from_dict(table or sim_table())
    truth_of = {"TFT": "TTF"}  # a depth outside the table runs as fast as TTF on this machine
    queue, answered, now, i = [], [], 0.0, 0
    while i < len(requests) or queue:
        while i < len(requests) and requests[i].arrival <= now:
            queue.append(requests[i])
            i += 1
        if not queue:
            now = requests[i].arrival
            continue
        result = policy.next(queue, now)
        if isinstance(result, Plan):
            for request in result.requests:
                queue.remove(request)
            index = truth.index(truth_of.get(result.skip, result.skip))
            seconds = truth.latency(index, result.images, "p50") / 1e3 * slowdown(now)
            if starts is not None:
                starts[id(result)] = now
            now += seconds
            policy.finished(result, seconds)
            answered += [(request, result, now) for request in result.requests]
        else:
            assert result > now  # the policy asks to be woken later, never in the past
            now = min(result, requests[i].arrival if i < len(requests) else math.inf)
    return answered


def poisson(rate: float, seconds: float, budget_ms: float, seed: int = 0, skip=lambda i: None) -> list[Pending]:
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append(Pending(1, skip(len(out)), t, t + budget_ms / 1e3, t))


def policy(budget_ms: float, max_batch: int = 8, max_wait_ms: float = 5.0) -> BatchPolicy:
    return BatchPolicy(adn.Governor(sim_table(), budget_ms), max_batch, max_wait_ms / 1e3)


def test_steady_load_is_batched_and_served_at_the_deepest_depth():
    starts: dict[int, float] = {}
    answered = simulate(policy(20), poisson(200, 2.0, 20), starts=starts)
    plans = list({id(plan): plan for _, plan, _ in answered}.values())
    assert len(answered) > 350 and all(done <= r.deadline for r, _, done in answered)
    assert all(plan.images <= 8 for plan in plans)
    # Requests that arrive while a batch runs share the next one; one that finds the worker free runs at
    # once: at 200/s, waiting would cost more than batching saves on this table.
    assert len(plans) < 0.9 * len(answered)
    runs = [(starts[id(plan)], done) for _, plan, done in answered]
    found_free = [(r, plan) for r, plan, _ in answered if not any(start < r.queued < end for start, end in runs)]
    assert len(found_free) > 0.3 * len(answered)
    assert all(starts[id(plan)] == r.queued for r, plan in found_free)
    assert sum(plan.skip == "FFF" for plan in plans) >= 0.95 * len(plans)


def test_a_slowdown_moves_to_shallower_depths_and_it_recovers_after():
    slow = lambda t: 3.0 if 1.0 <= t < 2.0 else 1.0  # noqa: E731
    governed = simulate(policy(20), poisson(200, 3.0, 20), slow)
    fixed = simulate(policy(20), poisson(200, 3.0, 20, skip=lambda i: "FFF"), slow)

    def late_share(answers, start, end):
        window = [(r, done) for r, _, done in answers if start <= r.arrival < end]
        return sum(done > r.deadline for r, done in window) / len(window)

    # The governor runs shallower depths while the machine is 3x slower and keeps (almost) every deadline;
    # the super-net alone cannot keep up and misses most of them.
    assert late_share(governed, 1.0, 2.0) < 0.1
    assert late_share(fixed, 1.0, 2.0) > 0.5
    during = [plan.skip for r, plan, _ in governed if 1.1 <= r.arrival < 2.0]
    assert during.count("FFF") < 0.1 * len(during)
    after = [plan.skip for r, plan, _ in governed if r.arrival >= 2.5]
    assert after.count("FFF") >= 0.95 * len(after)  # recovered: back at the most accurate depth
    assert late_share(governed, 0.0, 3.0) < 0.05


def test_a_burst_is_cut_into_full_batches_that_get_shallower_as_the_deadline_nears():
    burst = [Pending(1, None, 0.0, 0.050, 0.0) for _ in range(60)]
    answered = simulate(policy(50, max_batch=16), burst)
    plans = list({id(plan): plan for _, plan, _ in answered}.values())
    assert [p.images for p in plans] == [16, 16, 16, 12]
    assert all(done <= r.deadline for r, _, done in answered)  # 60 images in 50 ms: only by going shallower
    accuracy = [SIM_ACC[p.skip] for p in plans]
    assert accuracy == sorted(accuracy, reverse=True) and "FFF" not in {p.skip for p in plans}


def test_a_batch_is_only_as_deep_as_the_requests_queued_behind_it_allow():
    """60 requests at once, 40 ms each. Choosing each batch as deep as its own deadline allows runs the first
    at the super-net (its p99 fits 40 ms) and leaves the last 12 requests late; counting what the queue behind
    needs at the fastest depth keeps all 60 on time."""
    burst = [Pending(1, None, 0.0, 0.040, 0.0) for _ in range(60)]
    governor = adn.Governor(sim_table(), 40)
    answered = simulate(BatchPolicy(governor, 16, 0.005, headroom=False), burst)  # the queue alone decides
    plans = list({id(plan): plan for _, plan, _ in answered}.values())
    assert all(done <= r.deadline for r, _, done in answered)
    assert plans[0].skip == "TTF" and plans[0].slack_ms == pytest.approx(40)  # its own slack would allow FFF


def test_headroom_for_the_requests_about_to_arrive_keeps_bursts_on_time():
    """A batch cannot be stopped once it runs: a deep one started just before a burst makes the burst late.
    Keeping room for one budget's worth of expected arrivals (at the recent rate) halves the late answers
    under recurring bursts, and the effective accuracy rises with it. A table whose p99 is close to its
    p50 leaves no margin of its own."""
    tight = sim_table()
    for row in tight["depths"]:
        for cell in row["latency_ms"].values():
            cell["p99"] = 1.05 * cell["p50"]

    def run(headroom: bool) -> tuple[float, float]:
        late = effective = 0.0
        for seed in range(3):
            rng = random.Random(seed)
            arrivals = [r.arrival for r in poisson(400, 2.0, 20, seed=seed)]
            arrivals += [burst / 10 + rng.uniform(0, 0.002) for burst in range(1, 20) for _ in range(32)]
            requests = [Pending(1, None, t, t + 0.020, t) for t in sorted(arrivals)]
            answered = simulate(
                BatchPolicy(adn.Governor(tight, 20), 8, 0.005, headroom=headroom), requests, table=tight
            )
            late += sum(done > r.deadline for r, _, done in answered) / len(answered) / 3
            effective += sum(SIM_ACC[p.skip] for r, p, done in answered if done <= r.deadline) / len(answered) / 3
        return late, effective

    (late_without, accuracy_without), (late_with, accuracy_with) = run(False), run(True)
    assert late_without > 0.02 and late_with < 0.6 * late_without, (late_without, late_with)
    assert accuracy_with > accuracy_without + 1, (accuracy_without, accuracy_with)


def test_under_sustained_overload_of_the_super_net_the_backlog_is_kept_on_time():
    """1,000 requests/s: beyond what the super-net can serve (about 670/s in batches of 8), within what the
    base-net can: the governor keeps the deadlines at a mix of depths, deeper than the base-net."""
    requests = poisson(1000, 2.0, 20, seed=3)
    governed = simulate(policy(20), requests)
    late = sum(done > r.deadline for r, _, done in governed) / len(governed)
    accuracy = sum(SIM_ACC[plan.skip] for _, plan, _ in governed) / len(governed)
    fixed = simulate(policy(20), poisson(1000, 2.0, 20, seed=3, skip=lambda i: "FFF"))
    assert sum(done > r.deadline for r, _, done in fixed) / len(fixed) > 0.5
    assert late < 0.01, f"{late:.1%} late"
    assert accuracy > SIM_ACC["TTT"] + 1, accuracy  # deeper than the base-net where there is time for it


def test_fixed_depths_are_never_batched_with_another_depth():
    choices = [None, "TTT", "FFF", "TFT"]  # TFT is not in the table: it runs, and teaches the governor nothing
    rng = random.Random(1)
    requests = poisson(600, 1.0, 30, skip=lambda i: rng.choice(choices))
    answered = simulate(policy(30), requests)
    assert len(answered) == len(requests)
    for request, plan, _ in answered:
        assert {r.skip for r in plan.requests} == {request.skip}
        if request.skip is None:
            assert plan.chosen_by == "governor" and plan.skip in SIM_P50
        else:
            assert (plan.chosen_by, plan.skip) == ("request", request.skip)


def test_a_waiting_batch_never_waits_past_max_wait_or_what_its_deadline_allows():
    """On the fixed rule (--batch-wait fixed), which waits whenever a batch is not full; the adaptive rule
    waits within the same bounds (tests/test_batching.py)."""

    def fixed(budget_ms: float) -> BatchPolicy:
        return BatchPolicy(adn.Governor(sim_table(), budget_ms), 8, 0.005, adaptive=False)

    lone = Pending(1, None, 0.0, 1.0, 0.0)
    assert fixed(1000).next([lone], 0.0) == pytest.approx(0.005)  # max wait
    tight = Pending(1, None, 0.0, 0.008, 0.0)  # FFF's p99 at batch 1 is 6 ms: leave by 2 ms
    assert fixed(8).next([tight], 0.0) == pytest.approx(0.002)
    assert isinstance(fixed(8).next([tight], 0.002), Plan)
    full = [Pending(1, None, 0.0, 1.0, 0.0) for _ in range(8)]
    assert isinstance(fixed(1000).next(full, 0.0), Plan)  # a full batch leaves at once
    assert isinstance(fixed(1000).next([lone], 0.0, flush=True), Plan)  # shutting down: no waiting


# ----- the real server ----------------------------------------------------------------------------------------
CLASSES = [f"kind{i}" for i in range(10)]
MEAN, STD = 0.5, 0.25


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny ResNet-20 checkpoint (1 channel, 28 pixels, class names) and a depth table that lets the
    governor run the super-net at a generous budget."""
    from adn.utils.checkpoint_file import save_checkpoint

    folder = tmp_path_factory.mktemp("serve-model")
    torch.manual_seed(0)
    net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4))
    meta = {
        "model": "resnet20",
        "model_kwargs": {"width": 4},
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 28,
        "skip_aware_norm": True,
        "mean": [MEAN],
        "std": [STD],
        "class_names": CLASSES,
        "preprocess": {"image_size": 28, "resize_size": 28, "channels": 1, "mean": [MEAN], "std": [STD]},
    }
    save_checkpoint(folder / "checkpoint.pt", net, meta)
    rows = [("TTT", 80.0, 0.05), ("TFF", 85.0, 0.1), ("FFF", 90.0, 0.2)]
    table = {
        "batch_sizes": [1, 8],
        "depths": [
            {
                "skip": s,
                "acc1": acc,
                "macs": 1,
                "latency_ms": {"1": {"p50": ms, "p99": 2 * ms}, "8": {"p50": 4 * ms, "p99": 8 * ms}},
            }
            for s, acc, ms in rows
        ],
    }
    (folder / "depth_table.json").write_text(json.dumps(table))
    return folder


def make_service(model_dir, **changes) -> Service:
    settings = {
        "budget_ms": 10_000,
        "max_batch": 8,
        "max_wait_ms": 40,
        "max_body_bytes": 256 * 1024,
        "max_image_pixels": 1_000_000,
        **changes,
    }
    return Service.from_checkpoint(model_dir / "checkpoint.pt", ServeSettings(**settings))


@contextmanager
def running(service: Service):
    """The app on adn serve's uvicorn server (its connection limits from the service's settings) in a thread, on a
    free loopback port; an httpx client for it."""
    sock = adn_server.bind("127.0.0.1", 0)
    server = adn_server.make_server(create_app(service), service.settings, service.begin_drain)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def served(model_dir):
    service = make_service(model_dir)
    with running(service) as client:
        yield service, client


def png(seed: int, size=(28, 28), mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, "PNG")
    return buffer.getvalue()


def flat_png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, "PNG")
    return buffer.getvalue()


def expected(service: Service, images: list[bytes], skip: str) -> torch.Tensor:
    """The network's own probabilities for these images at this depth."""
    batch = torch.stack([service.predictor.preprocessing.load(data) for data in images])
    with torch.inference_mode():
        return torch.softmax(service.predictor.net(batch, skip=skip), dim=1)


def check_against_network(service: Service, images: list[bytes], answer: dict) -> None:
    probabilities = expected(service, images, answer["skip"])
    assert len(answer["predictions"]) == len(images)
    for row, prediction in zip(probabilities, answer["predictions"]):
        top = prediction["top"]
        assert [entry["index"] for entry in top] == row.topk(len(top)).indices.tolist()
        for entry in top:
            assert entry["class"] == CLASSES[entry["index"]]
            assert entry["probability"] == pytest.approx(row[entry["index"]].item(), abs=1e-5)


def post(client, images: list[bytes], **fields):
    headers = fields.pop("headers", None)
    files = [("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return client.post("/v1/predict", files=files, data=fields, headers=headers)


def test_single_and_batched_answers_agree_with_the_network_at_that_depth(served):
    service, client = served
    images = [png(seed) for seed in range(3)]
    for skip in (None, "TTT", "TFT"):
        fields = {"skip": skip} if skip else {}
        for image in images:
            answer = post(client, [image], **fields).json()
            assert answer["skip"] == (skip or "FFF")  # the governor runs the most accurate depth: it fits
            assert answer["chosen_by"] == ("request" if skip else "governor")
            check_against_network(service, [image], answer)
        answer = post(client, images, **fields, top_k="3").json()
        assert answer["batch"]["images"] == 3 and all(len(p["top"]) == 3 for p in answer["predictions"])
        check_against_network(service, images, answer)
    # The depth really changes the answer (otherwise the checks above could not tell depths apart).
    assert not torch.allclose(expected(service, images, "FFF"), expected(service, images, "TTT"), atol=1e-3)
    answer = post(client, images[:1], headers={"X-ADN-Skip": "base", "X-ADN-Budget-Ms": "5000"}).json()
    assert (answer["skip"], answer["budget_ms"], answer["deadline_met"]) == ("TTT", 5000.0, True)
    times = answer["time_ms"]
    assert times["total"] >= times["queue"] + times["compute"] > 0


def test_concurrent_requests_at_different_depths_are_never_mixed(served, monkeypatch):
    service, client = served
    real = service.engine

    def slow(batch, skip):  # requests pile up while a batch runs, so that they are batched
        time.sleep(0.02)
        return real(batch, skip)

    monkeypatch.setattr(service, "engine", Replaced(real, slow))
    asked = [None, "TTT", "FFF", "TFT", "base", None]
    jobs = [(asked[i % len(asked)], png(100 + i)) for i in range(24)]

    def send(job):
        skip, image = job
        return post(client, [image], **({"skip": skip} if skip else {}))

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, jobs))
    answers = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses), answers
    by_batch: dict[int, set] = {}
    for (skip, image), answer in zip(jobs, answers):
        by_batch.setdefault(answer["batch"]["id"], set()).add(answer["skip"])
        if skip is not None:
            assert answer["skip"] == str(adn.SkipConfig(skip, 3))
        check_against_network(service, [image], answer)  # every image ran at the depth its answer names
    assert all(len(skips) == 1 for skips in by_batch.values()), by_batch
    assert max(a["batch"]["requests"] for a in answers) > 1  # requests were batched together


@pytest.mark.parametrize("kind", ["rgba", "rgb", "16-bit", "large-jpeg"])
def test_images_are_converted_to_what_the_network_takes(served, kind):
    service, client = served
    if kind == "16-bit":
        buffer = io.BytesIO()
        Image.fromarray((np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80)).save(buffer, "PNG")
        data = buffer.getvalue()
    elif kind == "large-jpeg":
        buffer = io.BytesIO()
        Image.open(io.BytesIO(png(7, (300, 200), "RGB"))).save(buffer, "JPEG")
        data = buffer.getvalue()
    else:
        data = png(5, (40, 30), kind.upper())
    response = post(client, [data], skip="FFF")
    assert response.status_code == 200, response.text
    check_against_network(service, [data], response.json())


TRUNCATED_TYPE = "multipart/form-data; boundary=adnboundary"


def truncated_upload(data: bytes) -> bytes:
    """A multipart body with one image, cut off before its end (and its closing boundary)."""
    body = (
        b'--adnboundary\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--adnboundary--\r\n"
    )
    return body[: len(body) // 3]


def test_bad_input_gets_an_actionable_4xx_and_the_server_keeps_serving(served):
    service, client = served
    good = png(1)
    cases = [
        (post(client, [b"hello, not an image"]), 400, "not_an_image", "not a known image format"),
        (post(client, [b""]), 400, "not_an_image", "is empty"),
        (post(client, [good[:60]]), 400, "not_an_image", "PNG, JPEG"),
        (client.post("/v1/predict", files=[("skip", (None, "TTT"))]), 400, "no_image", "field 'file'"),
        (client.post("/v1/predict", files=[("file", (None, "TTT"))]), 400, "no_image", "text, not a file upload"),
        (client.post("/v1/predict", json={"image": "x"}), 415, "unsupported_media_type", "multipart/form-data"),
        (
            client.post("/v1/predict", content=truncated_upload(good), headers={"Content-Type": TRUNCATED_TYPE}),
            400,
            "truncated_body",
            "cut short",
        ),
        (
            client.post("/v1/predict", content=good, headers={"Content-Type": "image/png"}),
            415,
            "unsupported_media_type",
            "curl -F",
        ),
        (post(client, [good], skip="TTXF"), 400, "unknown_skip", "use only T and F"),
        (post(client, [good], skip="FFFF"), 400, "unknown_skip", "3 stages"),
        (post(client, [good], budget_ms="fast"), 400, "bad_budget", "positive number of milliseconds"),
        (post(client, [good], budget_ms="-5"), 400, "bad_budget", "such as 20"),
        (post(client, [good], budget_ms="nan"), 400, "bad_budget", "budget_ms 'nan'"),
        (post(client, [good], budget_ms="5", headers={"X-ADN-Budget-Ms": "7"}), 400, "bad_budget", "give one"),
        (post(client, [good], top_k="0"), 400, "bad_top_k", "positive whole number"),
        (post(client, [good], budget="5"), 400, "unknown_field", "budget_ms"),
        (post(client, [good] * 9), 400, "too_many_images", "--max-batch"),
        (post(client, [os.urandom(300 * 1024)]), 413, "body_too_large", "--max-body-mb"),
        (post(client, [flat_png((2000, 1000))]), 413, "image_too_large", "Mpixels"),  # 2 Mpixels, a few KB
        (post(client, [png(3, (400, 4))]), 400, "not_an_image", "aspect ratio"),
        (client.get("/v1/nothing"), 404, "not_found", "POST /v1/predict"),
        (client.get("/v1/predict"), 405, "method_not_allowed", "GET /v1/predict"),
    ]
    for response, status, code, phrase in cases:
        error = response.json()["error"]
        assert (response.status_code, error["status"], error["code"]) == (status, status, code), error
        assert phrase in error["message"], error
    assert client.get("/healthz").json()["status"] == "ok"
    assert post(client, [good]).status_code == 200


class Replaced:
    """The service's engine, its forward pass replaced by ``run``."""

    def __init__(self, engine, run):
        self.skips, self.backend, self.run = engine.skips, engine.backend, run

    def __call__(self, batch, skip):
        return self.run(batch, skip)


def test_a_failing_batch_answers_500_to_each_of_its_requests_and_serving_goes_on(served, monkeypatch, capsys):
    service, client = served
    real = service.engine

    def broken(batch, skip):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(service, "engine", Replaced(real, broken))
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda seed: post(client, [png(seed)], skip="TTT"), range(3)))
    for response in responses:
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "batch_failed"
        assert "simulated kernel failure" in response.json()["error"]["message"]
    assert "simulated kernel failure" in capsys.readouterr().err  # the traceback is logged
    monkeypatch.setattr(service, "engine", real)
    assert post(client, [png(0)], skip="TTT").status_code == 200


def test_a_full_queue_answers_503_with_retry_after(served, monkeypatch):
    service, client = served
    real, started = service.engine, threading.Event()

    def slow(batch, skip):
        started.set()
        time.sleep(0.5)
        return real(batch, skip)

    monkeypatch.setattr(service, "engine", Replaced(real, slow))
    monkeypatch.setattr(service.batcher, "max_queue", 1)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, client, [png(0)], skip="FFF")
        assert started.wait(10)  # its batch is running: the queue is empty again
        second = pool.submit(post, client, [png(1)], skip="FFF")
        deadline = time.monotonic() + 10
        while len(service.batcher) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        third = post(client, [png(2)], skip="FFF")  # the queue holds the second: no room
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert third.status_code == 503 and third.headers["retry-after"] == "1"
    assert third.json()["error"]["code"] == "overloaded"


def metric_samples(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_are_prometheus_text_and_count_what_happened(served):
    service, client = served
    before = metric_samples(client)
    assert post(client, [png(0)], skip="TFT").status_code == 200
    assert post(client, [png(1), png(2)]).status_code == 200
    late = post(client, [png(3)], budget_ms="0.001").json()  # no depth can make it: the fastest runs, late
    assert (late["skip"], late["deadline_met"]) == ("TTT", False)
    assert post(client, [b"junk"]).status_code == 400
    after = metric_samples(client)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("adn_requests_total", status="200") == 3 and grew("adn_requests_total", status="400") == 1
    assert grew("adn_batches_total", skip="TFT", chosen_by="request") == 1
    assert grew("adn_batches_total", skip="FFF", chosen_by="governor") == 1
    assert grew("adn_batches_total", skip="TTT", chosen_by="governor") == 1
    assert grew("adn_images_total", skip="FFF") == 2
    assert grew("adn_deadline_misses_total") == 1
    assert grew("adn_request_latency_seconds_count") == 3
    assert grew("adn_batch_size_images_sum") == 4
    assert after[("adn_queue_length", ())] == 0 and after[("adn_budget_seconds", ())] == 10.0
    # The server's budget is a bucket boundary: "answered within budget" is read exactly.
    assert ("adn_request_latency_seconds_bucket", (("le", "10.0"),)) in after


def test_depths_and_health(served):
    service, client = served
    depths = client.get("/v1/depths").json()
    assert [row["skip"] for row in depths["table"]["depths"]] == ["TTT", "TFF", "FFF"]
    assert depths["budget_ms"] == 10_000 and depths["quantile"] == "p99" and depths["backend"] == "eager"
    assert sorted(depths["skips"]) == sorted(str(c) for c in adn.SkipConfig.all(3))
    assert client.get("/healthz").json() == {"status": "ok", "model": "resnet20", "queue_length": 0}


def test_keep_alive_requests_are_not_held_back_by_nagles_algorithm(served):
    service, client = served
    times = []
    for _ in range(15):
        start = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        times.append(time.perf_counter() - start)
    # With Nagle's algorithm on the server's connections, each answer waited for the client's delayed ACK.
    assert sorted(times)[len(times) // 2] < 0.02, times


def test_serve_without_a_depth_table_says_how_to_make_one(model_dir, tmp_path, capsys):
    lonely = tmp_path / "checkpoint.pt"
    lonely.write_bytes((model_dir / "checkpoint.pt").read_bytes())
    assert main(["serve", "--checkpoint", str(lonely), "--budget-ms", "5", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "adn: error:" in err and "adn depth-table --checkpoint" in err and str(tmp_path / "depth_table.json") in err
    assert main(["serve", "--checkpoint", str(lonely), "--budget-ms", "-1", "--port", "0"]) == 2
    assert "--budget-ms -1.0: expected a positive number" in capsys.readouterr().err


def test_sigterm_answers_queued_requests_then_exits(model_dir):
    """adn serve in its own process; three requests wait for a fuller batch (up to 20 s, on the fixed rule);
    SIGTERM makes the server run them at once, answer them, and exit cleanly."""
    command = [
        sys.executable,
        "-m",
        "adn",
        "serve",
        "--checkpoint",
        str(model_dir / "checkpoint.pt"),
        "--budget-ms",
        "60000",
        "--max-wait-ms",
        "20000",
        "--batch-wait",
        "fixed",
        "--port",
        "0",
        "--threads",
        "1",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = None
        for line in process.stderr:  # "adn serve: listening on http://127.0.0.1:PORT ..."
            if "listening on " in line:
                url = line.split("listening on ")[1].split()[0]
                break
        assert url, "adn serve did not start"
        with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(post, client, [png(seed)]) for seed in range(3)]
            deadline = time.monotonic() + 30
            while metric_samples(client)[("adn_queue_length", ())] < 3:
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.05)
            stopped = time.monotonic()
            process.send_signal(signal.SIGTERM)
            answers = [future.result() for future in futures]
            assert time.monotonic() - stopped < 10  # not the 20 s they would have waited for company
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert {a.json()["batch"]["id"] for a in answers} == {1}
        assert process.wait(timeout=30) == 0
        assert "adn serve: stopped (the queue was drained)" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-per-depth"])
def test_onnx_runtime_sessions_are_made_once_and_depth_switches_reuse_them(model_dir, monkeypatch, backend):
    """onnxruntime: one session on one switchable file serves every depth (skip is an input);
    onnxruntime-per-depth: one session per depth. Either way nothing is made after start-up."""
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    from adn.serve.engine import Engine

    made = []

    class Counted(onnxruntime.InferenceSession):
        def __init__(self, *args, **kwargs):
            made.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Counted)
    net = adn.load(model_dir / "checkpoint.pt")
    engine = Engine(net, torch.zeros(1, 1, 28, 28), ["FFF", "TTT"], backend=backend)
    prepared = len(made)  # (the export opens each file once more to check it)
    if backend == "onnxruntime":  # (the file is checked under a temporary name, then opened once to serve)
        assert engine.layout == "switchable" and prepared == 2 and all("switchable.onnx" in p for p in made)
    else:
        assert engine.layout == "per-depth"
        assert {path.rsplit("_", 1)[-1] for path in made} == {"FFF.onnx", "TTT.onnx"}
    assert engine.skips == ["FFF", "TTT"]
    for size, skip in ((1, "TTT"), (3, "FFF"), (2, "TTT"), (5, "FFF")):  # switching depth and batch size
        batch = torch.randn(size, 1, 28, 28)
        with torch.inference_mode():
            assert torch.allclose(engine(batch, skip), net(batch, skip=skip), atol=1e-4)
    assert len(made) == prepared  # nothing exported or loaded after start-up
    with pytest.raises(ValueError, match="depth TFT was not prepared; prepared: FFF, TTT"):
        engine(torch.zeros(1, 1, 28, 28), "TFT")


def test_the_table_depths_can_be_served_alone_and_are_the_default_on_onnx_runtime(model_dir):
    """Preparing a depth on per-depth ONNX Runtime sessions is an export and a session: by default only the depths
    the governor can choose (the table's) and the two a request most often fixes (super-net, base-net) are prepared
    there. One switchable session serves every depth at the cost of one: all are prepared."""
    assert ServeSettings(budget_ms=10, backend="onnxruntime-per-depth").prepared_depths == "table"
    assert ServeSettings(budget_ms=10, backend="onnxruntime").prepared_depths == "all"
    assert ServeSettings(budget_ms=10).prepared_depths == "all"
    service = make_service(model_dir, depths="table")
    assert service.engine.skips == ["FFF", "TFF", "TTT"]  # the table's three, which include super and base
    assert service.parse_skip("tff") == "TFF"
    with pytest.raises(ApiError, match="depth FTF is not served here; served: FFF, TFF, TTT"):
        service.parse_skip("FTF")
    assert len(make_service(model_dir).engine.skips) == 8
    with pytest.raises(ValueError, match="--depths some: expected all or table"):
        ServeSettings(budget_ms=10, depths="some")

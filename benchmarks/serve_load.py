"""Open-loop load on `adn serve`: the governor against fixed depths at the same offered load.

For each arm (governor; fixed super-net; fixed base-net) a fresh `adn serve` is started on a free
loopback port and sent the same arrival schedule: Poisson arrivals at --rate requests/s for --seconds,
plus a burst of --burst-size requests within --burst-ms at --burst-at (a fraction of the run). The client is
open-loop: each request leaves at its scheduled time whether or not earlier ones were answered, and its
latency counts from that time. With several batching rules (--batch-wait adaptive,fixed), every arm runs
under each, one after the other, on the same schedule. Reported per arm:

* p50 / p99 latency of the answers (client side: HTTP included), share of requests answered within the
  budget (errors and late answers count against it), throughput (answers per second);
* effective accuracy: the mean, over all requests sent, of the top-1 accuracy of the depth that answered,
  from the depth table (or --eval for depths not in it), counting a late or failed answer as wrong;
* the server's own median queue time (the answers' time_ms.queue) and images per batch.

A plot shows latency and the depth the governor chose over time through the burst. Bounded: at most
--max-requests requests per arm, and each arm stops waiting --grace-s seconds after its last send.
Loopback only; trains nothing.

    python benchmarks/serve_load.py --checkpoint runs/demo/checkpoint.pt --budget-ms 5 \
        [--table depth_table.json] [--eval eval.json] [--rate 200] [--seconds 20] [--output serve_load]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ARMS = {"governor": None, "super": "super", "base": "base"}


def schedule(
    rate: float, seconds: float, burst_at: float, burst_size: int, burst_ms: float, max_requests: int, seed: int
) -> list[float]:
    """Send times (s from the start): Poisson arrivals plus a burst, sorted, at most max_requests."""
    rng, t, times = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        times.append(t)
    start = burst_at * seconds
    times += [start + rng.uniform(0, burst_ms / 1e3) for _ in range(burst_size)]
    return sorted(times)[:max_requests]


def sample_images(meta: dict, count: int = 16) -> list[bytes]:
    """Random PNGs of the network's size and channels (the content does not change the time)."""
    from adn.vision.preprocess import Preprocessing

    prep = Preprocessing.from_meta(meta)
    rng = np.random.default_rng(0)
    shape = (prep.image_size, prep.image_size) + ((prep.channels,) if prep.channels > 1 else ())
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def parse_cpus(text: str | None) -> set[int] | None:
    """ "0" or "0,1" or "2-5": CPU numbers for os.sched_setaffinity; None or "" for no pinning."""
    if not text:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


class Server:
    """`adn serve` in a subprocess on a free loopback port."""

    def __init__(self, args, batch_wait: str = "adaptive"):
        command = [
            sys.executable,
            "-m",
            "adn",
            "serve",
            "--checkpoint",
            args.checkpoint,
            "--budget-ms",
            str(args.budget_ms),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-batch",
            str(args.max_batch),
            "--max-wait-ms",
            str(args.max_wait_ms),
            "--batch-wait",
            batch_wait,
            "--backend",
            args.backend,
        ]
        if args.table:
            command += ["--table", args.table]
        if args.no_headroom:
            command += ["--no-headroom"]
        if args.server_threads:
            command += ["--threads", str(args.server_threads)]
        cpus = parse_cpus(args.server_cpus)
        # Pinned, the server does not share its cores with the load generator (whose HTTP work would
        # otherwise be counted as the server's latency).
        self.process = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self.url = None
        for line in self.process.stderr:
            if "listening on " in line:
                self.url = line.split("listening on ")[1].split()[0]
                break
            print(f"  server: {line.rstrip()}", file=sys.stderr)
        if self.url is None:
            raise SystemExit(f"adn serve did not start (exit status {self.process.wait()})")
        # Keep reading its stderr (warnings, failure tracebacks): a full pipe would stall the server.
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        for line in self.process.stderr:
            print(f"  server: {line.rstrip()}", file=sys.stderr)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def run_arm(url: str, times: list[float], images: list[bytes], skip: str | None, grace_s: float) -> list[dict]:
    """Send one request per scheduled time (open loop); one record per request."""
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    headers = {"X-ADN-Skip": skip} if skip else {}
    records: list[dict] = [{} for _ in times]
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=grace_s + 5) as client:

        async def send(i: int, due: float) -> None:
            files = {"file": (f"{i}.png", images[i % len(images)], "image/png")}
            try:
                response = await client.post("/v1/predict", files=files, headers=headers)
                body = response.json()
                records[i] = {
                    "sent": due - start,
                    "latency_ms": (time.perf_counter() - due) * 1e3,
                    "status": response.status_code,
                    "skip": body.get("skip"),
                    "server_ms": body.get("time_ms", {}).get("total"),
                    "queue_ms": body.get("time_ms", {}).get("queue"),
                    "batch_images": body.get("batch", {}).get("images"),
                }
            except (httpx.HTTPError, ValueError) as error:
                records[i] = {"sent": due - start, "latency_ms": None, "status": type(error).__name__}

        start = time.perf_counter() + 0.2
        tasks = []
        for i, t in enumerate(times):
            due = start + t
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(i, due)))
        done, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
    return [r or {"sent": None, "latency_ms": None, "status": "unanswered"} for r in records]


def summarize(records: list[dict], budget_ms: float, accuracy: dict[str, float]) -> dict:
    ok = [r for r in records if r["status"] == 200]
    latencies = sorted(r["latency_ms"] for r in ok)
    within = [r for r in ok if r["latency_ms"] <= budget_ms]
    span = max((r["sent"] + r["latency_ms"] / 1e3 for r in ok), default=0) - min((r["sent"] for r in ok), default=0)
    missing = sorted({r["skip"] for r in within if r["skip"] not in accuracy})
    depths: dict[str, int] = {}
    for r in ok:
        depths[r["skip"]] = depths.get(r["skip"], 0) + 1
    return {
        "sent": len(records),
        "answered": len(ok),
        "errors": {str(s): sum(r["status"] == s for r in records) for s in {r["status"] for r in records} if s != 200},
        "p50_ms": _quantile(latencies, 0.5),
        "p99_ms": _quantile(latencies, 0.99),
        "within_budget": len(within) / len(records) if records else None,
        "throughput_per_s": len(ok) / span if span > 0 else None,
        "effective_acc1": None if missing else sum(accuracy[r["skip"]] for r in within) / len(records),
        "accuracy_unknown_for": missing,
        "depths": depths,
        "server_queue_p50_ms": _quantile(sorted(r["queue_ms"] for r in ok if r.get("queue_ms") is not None), 0.5),
        "batch_images_mean": float(np.mean([r["batch_images"] for r in ok])) if ok else None,
    }


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[max(0, int(np.ceil(q * len(sorted_values))) - 1)]


def accuracies(table: dict, eval_json: str | None, num_stages: int) -> dict[str, float]:
    """top-1 accuracy per depth ("TTF"): the table's, completed by `adn eval --json` rows."""
    import adn

    found = {}
    if eval_json:
        for row in json.loads(Path(eval_json).read_text()):
            found[str(adn.SkipConfig(row["skip"], num_stages))] = row["acc1"]
    found.update({row["skip"]: row["acc1"] for row in table["depths"]})
    return found


def plot(results: dict, budget_ms: float, table: dict, burst: tuple[float, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colors = {"governor": "tab:blue", "super": "tab:red", "base": "tab:green"}
    for arm, records in results.items():
        ok = [r for r in records if r["status"] == 200]
        top.scatter(
            [r["sent"] for r in ok],
            [r["latency_ms"] for r in ok],
            s=4,
            alpha=0.5,
            color=colors.get(arm),
            label=f"{arm}",
        )
    top.axhline(budget_ms, color="black", linestyle="--", linewidth=1, label=f"budget {budget_ms:g} ms")
    top.set_yscale("log")
    top.set_ylabel("latency (ms, client side)")
    top.legend(loc="upper right", fontsize=8, markerscale=3)
    order = [row["skip"] for row in table["depths"]]  # least accurate first
    first_governor = next((records for arm, records in results.items() if arm.startswith("governor")), [])
    governed = [r for r in first_governor if r["status"] == 200 and r["skip"] in order]
    bottom.scatter([r["sent"] for r in governed], [order.index(r["skip"]) for r in governed], s=4, color="tab:blue")
    bottom.set_yticks(range(len(order)), [f"{s} ({row['acc1']:.1f}%)" for s, row in zip(order, table["depths"])])
    bottom.set_ylabel("depth the governor chose")
    bottom.set_xlabel("send time (s)")
    for axis in (top, bottom):
        axis.axvspan(burst[0], burst[1], color="orange", alpha=0.2)
    top.set_title("adn serve under open-loop load (burst shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="file written by adn train")
    parser.add_argument("--table", default=None, help="depth table (default: depth_table.json next to the checkpoint)")
    parser.add_argument("--eval", default=None, help="adn eval --json output: accuracy of depths not in the table")
    parser.add_argument("--budget-ms", type=float, required=True)
    parser.add_argument("--rate", type=float, default=200.0, help="Poisson arrivals per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the Poisson schedule")
    parser.add_argument("--burst-at", type=float, default=0.5, help="when the burst starts, as a fraction of --seconds")
    parser.add_argument("--burst-size", type=int, default=200, help="requests in the burst")
    parser.add_argument("--burst-ms", type=float, default=100.0, help="the burst's requests leave within this time")
    parser.add_argument("--max-requests", type=int, default=20_000, help="at most this many requests per arm")
    parser.add_argument("--grace-s", type=float, default=30.0, help="wait at most this long after the last send")
    parser.add_argument("--arms", default="governor,super,base", help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument(
        "--batch-wait",
        default="adaptive",
        help="adn serve's batching rule(s), comma-separated: adaptive, fixed, or both (each arm "
        "runs under each, side by side)",
    )
    parser.add_argument("--backend", default="eager", choices=("eager", "onnxruntime"))
    parser.add_argument("--server-threads", type=int, default=None, help="torch threads of the server")
    parser.add_argument("--no-headroom", action="store_true", help="pass --no-headroom to adn serve")
    parser.add_argument("--server-cpus", default=None, help="pin the server to these CPUs (e.g. 0 or 0-3; Linux)")
    parser.add_argument("--client-cpus", default=None, help="pin this load generator to these CPUs (e.g. 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="serve_load", help="folder for results.json and serve_load.png")
    args = parser.parse_args()
    client_cpus = parse_cpus(args.client_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    arms = [a.strip() for a in args.arms.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    rules = [r.strip() for r in args.batch_wait.split(",")]
    if not set(rules) <= {"adaptive", "fixed"}:
        parser.error(f"--batch-wait {args.batch_wait}: give adaptive, fixed or adaptive,fixed")

    from adn.utils.checkpoint_file import load_checkpoint

    meta = load_checkpoint(args.checkpoint)["meta"]
    images = sample_images(meta)
    times = schedule(
        args.rate, args.seconds, args.burst_at, args.burst_size, args.burst_ms, args.max_requests, args.seed
    )
    burst = (args.burst_at * args.seconds, args.burst_at * args.seconds + args.burst_ms / 1e3)
    print(
        f"{len(times)} requests per arm: Poisson {args.rate:g}/s for {args.seconds:g} s + a burst of "
        f"{args.burst_size} within {args.burst_ms:g} ms at {burst[0]:.1f} s; budget {args.budget_ms:g} ms",
        file=sys.stderr,
    )
    results, summaries, table = {}, {}, None
    for arm, rule in [(arm, rule) for arm in arms for rule in rules]:
        name = arm if len(rules) == 1 else f"{arm} ({rule})"
        server = Server(args, rule)
        try:
            table = httpx.get(f"{server.url}/v1/depths", timeout=10).json()["table"]
            num_stages = len(table["depths"][0]["skip"])
            for i in range(20):  # warm up (first requests pay for lazy set-up); not counted
                httpx.post(
                    f"{server.url}/v1/predict", files={"file": ("warm.png", images[i % len(images)])}, timeout=30
                )
            print(f"{name}: sending to {server.url}", file=sys.stderr)
            results[name] = asyncio.run(run_arm(server.url, times, images, ARMS[arm], args.grace_s))
        finally:
            server.stop()
        summaries[name] = summarize(results[name], args.budget_ms, accuracies(table, args.eval, num_stages))

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    conditions = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "budget_ms": args.budget_ms,
        "rate": args.rate,
        "seconds": args.seconds,
        "burst_size": args.burst_size,
        "burst_ms": args.burst_ms,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "batch_wait": rules,
        "backend": args.backend,
        "server_threads": args.server_threads,
        "cpus": os.cpu_count(),
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
        "headroom": not args.no_headroom,
        "seed": args.seed,
    }
    (output / "results.json").write_text(
        json.dumps({"conditions": conditions, "arms": summaries, "requests": results}, indent=1)
    )
    plot(results, args.budget_ms, table, burst, output / "serve_load.png")
    width = max(9, *map(len, summaries))
    print(
        f"{'arm':>{width}}  {'sent':>6}  {'answered':>8}  {'p50 ms':>8}  {'p99 ms':>8}  {'in budget':>9}  "
        f"{'answers/s':>9}  {'eff. acc@1':>10}  {'queue p50':>9}  {'img/batch':>9}  depths"
    )
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    for arm, s in summaries.items():
        print(
            f"{arm:>{width}}  {s['sent']:>6}  {s['answered']:>8}  {fmt(s['p50_ms'], '8.2f'):>8}  "
            f"{fmt(s['p99_ms'], '8.2f'):>8}  {fmt(s['within_budget'] and 100 * s['within_budget'], '8.1f'):>8}%  "
            f"{fmt(s['throughput_per_s'], '9.1f'):>9}  {fmt(s['effective_acc1'], '10.2f'):>10}  "
            f"{fmt(s['server_queue_p50_ms'], '9.2f'):>9}  {fmt(s['batch_images_mean'], '9.2f'):>9}  {s['depths']}"
        )
        if s["accuracy_unknown_for"]:
            print(f"           (accuracy of {', '.join(s['accuracy_unknown_for'])} unknown: pass --eval eval.json)")
    print(f"results: {output / 'results.json'}   plot: {output / 'serve_load.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()

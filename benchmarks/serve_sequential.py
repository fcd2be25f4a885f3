"""Low load on `adn serve`: one client, one request at a time, under each batching rule side by side.

The case of issue 23: with nothing else queued, the fixed rule held every request --max-wait-ms for company
that could not come (the client sends its next request only after this answer). One `adn serve` per rule
(--batch-wait adaptive, --batch-wait fixed) is started on a free loopback port; the client alternates
between them, one request at a time, so that both see the same machine at the same moments. Reported per
rule: the client's median latency (HTTP included) and the medians of the server's own time_ms (decode,
queue, compute, total) from the answers, against the issue's targets: queue <= 0.5 ms and total <= decode +
compute + 1 ms.

    python benchmarks/serve_sequential.py --checkpoint runs/demo/checkpoint.pt --budget-ms 20 \
        --requests 100 --server-threads 1 --server-cpus 0 --client-cpus 1 [--output serve_sequential]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import Server, parse_cpus, sample_images  # noqa: E402

PARTS = ("decode", "queue", "compute", "total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="file written by adn train")
    parser.add_argument("--table", default=None, help="depth table (default: depth_table.json next to the checkpoint)")
    parser.add_argument("--budget-ms", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=100, help="timed requests per rule")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per rule first")
    parser.add_argument("--rules", default="adaptive,fixed", help="--batch-wait values to compare")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--backend", default="eager", choices=("eager", "onnxruntime"))
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--server-cpus", default=None, help="pin the servers to these CPUs (e.g. 0; Linux)")
    parser.add_argument("--client-cpus", default=None, help="pin this client to these CPUs (e.g. 1)")
    parser.add_argument("--output", default=None, help="folder for results.json (default: print only)")
    args = parser.parse_args()
    args.no_headroom = False
    client_cpus = parse_cpus(args.client_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    rules = [r.strip() for r in args.rules.split(",")]

    from adn.utils.checkpoint_file import load_checkpoint

    images = sample_images(load_checkpoint(args.checkpoint)["meta"])
    servers = {}
    try:
        for rule in rules:
            servers[rule] = Server(args, rule)
        clients = {rule: httpx.Client(base_url=server.url, timeout=30) for rule, server in servers.items()}
        records: dict[str, list[dict]] = {rule: [] for rule in rules}
        for i in range(args.warmup + args.requests):
            for rule in rules if i % 2 == 0 else rules[::-1]:  # alternate which rule goes first
                files = {"file": (f"{i}.png", images[i % len(images)], "image/png")}
                start = time.perf_counter()
                response = clients[rule].post("/v1/predict", files=files)
                client_ms = (time.perf_counter() - start) * 1e3
                if response.status_code != 200:
                    raise SystemExit(f"{rule}: HTTP {response.status_code}: {response.text[:300]}")
                if i >= args.warmup:
                    body = response.json()
                    records[rule].append({"client": client_ms, **body["time_ms"], "batch": body["batch"]["images"]})
        for client in clients.values():
            client.close()
    finally:
        for server in servers.values():
            server.stop()

    summary = {
        rule: {part: float(np.median([r[part] for r in rows])) for part in ("client", *PARTS)}
        for rule, rows in records.items()
    }
    print(
        f"{args.requests} sequential requests per rule, budget {args.budget_ms:g} ms, max wait "
        f"{args.max_wait_ms:g} ms, {args.server_threads} server thread(s); medians, ms"
    )
    print(
        f"{'rule':>9}  {'client':>7}  {'decode':>7}  {'queue':>7}  {'compute':>7}  {'total':>7}  "
        f"{'queue <= 0.5':>12}  {'total <= decode + compute + 1':>29}"
    )
    for rule, s in summary.items():
        queue_ok = "met" if s["queue"] <= 0.5 else "missed"
        total_ok = "met" if s["total"] <= s["decode"] + s["compute"] + 1 else "missed"
        print(
            f"{rule:>9}  {s['client']:7.2f}  {s['decode']:7.2f}  {s['queue']:7.2f}  {s['compute']:7.2f}  "
            f"{s['total']:7.2f}  {queue_ok:>12}  {total_ok:>29}"
        )
    if args.output:
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        conditions = {k: v for k, v in vars(args).items() if k != "output"}
        (output / "results.json").write_text(
            json.dumps({"conditions": conditions, "medians_ms": summary, "requests": records}, indent=1)
        )
        print(f"results: {output / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()

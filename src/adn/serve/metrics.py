"""What ``GET /metrics`` reports, in Prometheus' text format. Each server has its own registry (not the
process-wide default), so that several servers, or tests, in one process do not mix their counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds. Fine steps where small networks answer (a millisecond or two), coarse ones up to a stall.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's counters, gauges and histograms (names are listed in docs/serving.md)."""

    def __init__(self, budget_ms: float):
        self.registry = registry = CollectorRegistry()
        # The budget is a bucket boundary, so that "answered within budget" reads exactly off the histogram.
        buckets = tuple(sorted(set(LATENCY_BUCKETS) | {budget_ms / 1e3}))
        self.requests = Counter(
            "adn_requests", "POST /v1/predict requests answered, by HTTP status code", ["status"], registry=registry
        )
        self.deadline_misses = Counter(
            "adn_deadline_misses", "requests answered after their budget had passed", registry=registry
        )
        self.batches = Counter(
            "adn_batches",
            "batches run, by depth and by who chose the depth (governor or request)",
            ["skip", "chosen_by"],
            registry=registry,
        )
        self.images = Counter("adn_images", "images classified, by depth", ["skip"], registry=registry)
        self.batch_failures = Counter(
            "adn_batch_failures", "batches that failed (each of their requests got a 5xx)", registry=registry
        )
        self.queue_length = Gauge("adn_queue_length", "requests waiting for a batch", registry=registry)
        self.queue_images = Gauge("adn_queue_images", "images waiting for a batch", registry=registry)
        self.latency = Histogram(
            "adn_request_latency_seconds",
            "time from a request's arrival to its answer (decoding, queue and compute), for requests that were run",
            buckets=buckets,
            registry=registry,
        )
        self.compute = Histogram(
            "adn_batch_compute_seconds", "forward pass time of each batch", buckets=buckets, registry=registry
        )
        self.batch_size = Histogram(
            "adn_batch_size_images", "images per batch", buckets=BATCH_BUCKETS, registry=registry
        )
        self.governor_factor = Gauge(
            "adn_governor_factor",
            "the governor's correction factor: observed time over the depth table's median (1: as measured)",
            registry=registry,
        )
        self.budget = Gauge("adn_budget_seconds", "the server's default latency budget", registry=registry)
        self.budget.set(budget_ms / 1e3)
        self.governor_factor.set(1.0)

    def queue_changed(self, requests: int, images: int) -> None:
        self.queue_length.set(requests)
        self.queue_images.set(images)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

"""The model side of ``adn serve``, apart from HTTP: a trained network with its preprocessing and class
names, an engine with every depth prepared, the governor, the batching queue and the metrics.

:meth:`Service.predict` queues decoded images and waits (without blocking the event loop) for the answer
the worker thread gives when their batch has run::

    {"skip": "TTF", "chosen_by": "governor", "budget_ms": 20.0, "deadline_met": true,
     "time_ms": {"decode": 0.4, "queue": 1.2, "compute": 3.1, "total": 4.8},
     "batch": {"id": 17, "images": 4, "requests": 3},
     "predictions": [{"file": "shoe.png", "top": [{"class": "Sneaker", "index": 7, "probability": 0.93}, ...]}]}
"""
from __future__ import annotations

import asyncio
import io
import itertools
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..core.skip import SkipConfig
from ..deploy.depth_table import DepthTable
from ..deploy.governor import Governor
from ..deploy.predict import Predictor, depth_table_for, top_k
from ..vision.preprocess import ImageError, ImageTooLarge
from .batcher import Batcher, Draining, QueueFull
from .engine import Engine
from .errors import ApiError
from .metrics import Metrics
from .policy import BatchPolicy, Pending, Plan

MAX_BUDGET_MS = 600_000.0  # ten minutes: a budget beyond it is a typo, not a latency target
BATCH_WAITS = ("adaptive", "fixed")


@dataclass(frozen=True)
class ServeSettings:
    """The server's knobs; ``adn serve`` flags map one to one (``--max-batch`` -> ``max_batch``)."""

    budget_ms: float
    max_batch: int = 32            # images per batch (and per request)
    max_wait_ms: float = 5.0       # the longest the oldest request may wait for a fuller batch
    # "adaptive": a batch waits for a fuller one only while the recent arrival rate says that pays (never when
    # nothing is coming), at most max_wait_ms; "fixed": every batch that is not full waits max_wait_ms.
    batch_wait: str = "adaptive"
    max_queue: int = 256           # images queued; beyond, requests are refused with 503
    max_body_bytes: int = 16 << 20
    max_image_pixels: int = 40_000_000
    top_k: int = 5
    quantile: str = "p99"
    backend: str = "eager"
    # Which depths to prepare at start-up: "all" 2^N, or "table" (the depth table's, plus the super-net and
    # the base-net, which requests fix most often). None: all on eager (a depth there is flags, free to
    # prepare) and on onnxruntime (one switchable session: a depth is an input), the table's on
    # onnxruntime-per-depth (each depth is an export and a session: seconds apiece).
    depths: str | None = None
    headroom: bool = True          # keep room for the requests expected within one budget (BatchPolicy)

    @property
    def prepared_depths(self) -> str:
        return self.depths or ("table" if self.backend == "onnxruntime-per-depth" else "all")

    def __post_init__(self):
        checks = [
            ("--budget-ms", self.budget_ms, 0 < self.budget_ms <= MAX_BUDGET_MS,
             f"a positive number of milliseconds, at most {MAX_BUDGET_MS:g}"),
            ("--max-batch", self.max_batch, self.max_batch >= 1, "a positive number of images"),
            ("--max-wait-ms", self.max_wait_ms, 0 <= self.max_wait_ms <= MAX_BUDGET_MS, "zero or more milliseconds"),
            ("--batch-wait", self.batch_wait, self.batch_wait in BATCH_WAITS, " or ".join(BATCH_WAITS)),
            ("--max-queue", self.max_queue, self.max_queue >= self.max_batch, "at least --max-batch images"),
            ("--max-body-mb", self.max_body_bytes, self.max_body_bytes >= 1024, "at least 0.001 MB"),
            ("--max-image-mpixels", self.max_image_pixels, self.max_image_pixels >= 1, "positive"),
            ("--top-k", self.top_k, self.top_k >= 1, "a positive number of classes"),
            ("--depths", self.depths, self.depths in (None, "all", "table"), "all or table"),
        ]
        for flag, value, ok, expected in checks:
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"{flag} {value}: expected {expected}")


@dataclass
class _Job:
    """What a queued request carries: its images and where its answer goes."""

    images: torch.Tensor
    names: list[str]
    top_k: int
    budget_ms: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class Service:
    def __init__(self, predictor: Predictor, governor: Governor, settings: ServeSettings, engine: Engine | None = None,
                 clock=time.perf_counter):
        self.predictor, self.governor, self.settings, self.clock = predictor, governor, settings, clock
        self.metrics = Metrics(settings.budget_ms)
        example = torch.zeros(1, *predictor.preprocessing.input_shape)
        self.engine = engine or Engine(predictor.net, example, self._depths_to_prepare(), backend=settings.backend)
        self._warm_up_decoding()
        self.policy = BatchPolicy(governor, settings.max_batch, settings.max_wait_ms / 1e3, settings.headroom,
                                  adaptive=settings.batch_wait == "adaptive")
        self.batcher = Batcher(self.policy, self._execute, self._fail, settings.max_queue, clock,
                               on_change=self.metrics.queue_changed)
        self._batch_ids = itertools.count(1)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, settings: ServeSettings,
                        table: str | os.PathLike | None = None) -> Service:
        """Load the checkpoint and its depth table (default: depth_table.json next to it), prepare every depth."""
        predictor = Predictor.from_checkpoint(checkpoint)
        depth_table = depth_table_for(checkpoint, table, predictor.num_stages)
        return cls(predictor, Governor(depth_table, settings.budget_ms, settings.quantile), settings)

    @classmethod
    def from_export(cls, folder: str | os.PathLike, settings: ServeSettings,
                    table: str | os.PathLike | None = None) -> Service:
        """Serve a switchable export folder (``adn export --format onnx --switchable``) without the checkpoint: its
        ONNX file in one ONNX Runtime session, preprocessing and class names from its manifest, and the depth
        table ``table``, else the manifest's, else ``depth_table.json`` in the folder."""
        predictor, file, manifest = Predictor.from_export(folder)
        n = predictor.num_stages
        if table is None and isinstance(manifest.get("depth_table"), dict):
            depth_table = DepthTable.from_dict(manifest["depth_table"], source=f"{folder}/manifest.json's depth_table")
        elif table is None and not (Path(folder) / "depth_table.json").is_file():
            raise ValueError(f"--model-dir {folder}: the export carries no depth table; pass --table FILE (from adn "
                             f"depth-table), or export with one next to the checkpoint (adn export --table FILE)")
        else:
            depth_table = depth_table_for(Path(folder) / "manifest.json", table, n)
        governor = Governor(depth_table, settings.budget_ms, settings.quantile)
        example = torch.zeros(1, *predictor.preprocessing.input_shape)
        engine = Engine(None, example, _depths_to_prepare(settings, governor.table, n), backend=settings.backend,
                        switchable_file=file, num_stages=n)
        return cls(predictor, governor, settings, engine=engine)

    def _depths_to_prepare(self) -> list[str] | None:
        return _depths_to_prepare(self.settings, self.governor.table, self.predictor.num_stages)

    def _warm_up_decoding(self) -> None:
        """The first image of a format pays for loading PIL's decoder and building the transforms: here,
        not on a request."""
        for image_format in ("PNG", "JPEG"):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buffer, image_format)
            self.predictor.preprocessing.load(buffer.getvalue())

    # ----- life cycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()

    def begin_drain(self) -> None:
        """Stop taking requests; run the queued ones at once."""
        self.batcher.begin_drain()

    def close(self) -> None:
        """Answer everything queued, then stop the worker."""
        self.batcher.close()

    # ----- what a request may ask ----------------------------------------------------------------------------
    def parse_skip(self, text: str | None) -> str | None:
        if text is None or not text.strip():
            return None
        try:
            skip = str(SkipConfig(text, self.predictor.num_stages))
        except ValueError as error:
            raise ApiError(400, "unknown_skip", f"skip {text!r} is not a depth of this network: {error} Leave skip out "
                                                f"to let the server choose the depth for the budget") from error
        if skip not in self.engine.skips:
            raise ApiError(400, "unknown_skip", f"depth {skip} is not served here; served: {', '.join(self.engine.skips)}")
        return skip

    def parse_budget(self, text: str | None) -> float:
        if text is None or not text.strip():
            return self.settings.budget_ms
        try:
            budget = float(text)
        except ValueError:
            budget = math.nan
        if not (math.isfinite(budget) and 0 < budget <= MAX_BUDGET_MS):
            raise ApiError(400, "bad_budget", f"budget_ms {text!r}: give a positive number of milliseconds (at most "
                                              f"{MAX_BUDGET_MS:g}), such as 20; leave it out for the server's "
                                              f"{self.settings.budget_ms:g} ms")
        return budget

    def parse_top_k(self, text: str | None) -> int:
        if text is None or not text.strip():
            return self.settings.top_k
        try:
            k = int(text)
        except ValueError:
            k = 0
        if k < 1:
            raise ApiError(400, "bad_top_k", f"top_k {text!r}: give a positive whole number of classes, such as 5")
        return min(k, len(self.predictor.class_names))

    def load_images(self, files: list[tuple[str, bytes]]) -> torch.Tensor:
        """Decoded, resized and normalized images as one tensor; 400/413 for files that cannot be used."""
        preprocessing = self.predictor.preprocessing
        tensors = []
        for name, data in files:
            try:
                tensors.append(preprocessing.load(data, name=f"file {name!r}", max_pixels=self.settings.max_image_pixels))
            except ImageTooLarge as error:
                raise ApiError(413, "image_too_large", str(error)) from error
            except ImageError as error:
                raise ApiError(400, "not_an_image", str(error)) from error
        return torch.stack(tensors)

    # ----- answering -----------------------------------------------------------------------------------------
    async def predict(self, images: torch.Tensor, names: list[str], skip: str | None, budget_ms: float, k: int,
                      arrival: float) -> dict:
        """Queue the images as one request and wait for its batch. Raises :class:`ApiError` (503 when the
        queue is full or the server is shutting down, 500 when its batch failed)."""
        loop = asyncio.get_running_loop()
        job = _Job(images, names, k, budget_ms, loop, loop.create_future())
        request = Pending(len(images), skip, arrival, arrival + budget_ms / 1e3, self.clock(), job)
        try:
            self.batcher.submit(request)
        except QueueFull as error:
            raise ApiError(503, "overloaded", f"the server is overloaded ({error}); retry in a moment, or send to "
                                              f"another instance", headers={"Retry-After": "1"}) from error
        except Draining as error:
            raise ApiError(503, "shutting_down", "the server is shutting down and takes no new requests; retry on "
                                                 "another instance") from error
        return await job.future

    def describe(self) -> dict:
        """What GET /v1/depths answers: the depth table and how the server uses it."""
        return {"budget_ms": self.settings.budget_ms, "quantile": self.governor.quantile,
                "correction_factor": self.governor.factor, "backend": self.engine.backend,
                "max_batch": self.settings.max_batch, "max_wait_ms": self.settings.max_wait_ms,
                "batch_wait": self.settings.batch_wait,
                "skips": self.engine.skips, "table": self.governor.table.to_dict()}

    def health(self) -> dict:
        return {"status": "draining" if self.batcher.draining else "ok", "model": self.predictor.meta["model"],
                "queue_length": len(self.batcher)}

    # ----- the worker thread's side ----------------------------------------------------------------------------
    def _execute(self, plan: Plan) -> None:
        batch = torch.cat([request.payload.images for request in plan.requests])
        start = self.clock()
        logits = self.engine(batch, plan.skip)
        seconds = self.clock() - start
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError(f"the network gave NaN or infinite outputs at depth {plan.skip}")
        self.policy.finished(plan, seconds)
        done = self.clock()
        batch_info = {"id": next(self._batch_ids), "images": plan.images, "requests": len(plan.requests)}
        metrics = self.metrics
        metrics.batches.labels(plan.skip, plan.chosen_by).inc()
        metrics.images.labels(plan.skip).inc(plan.images)
        metrics.batch_size.observe(plan.images)
        metrics.compute.observe(seconds)
        metrics.governor_factor.set(self.governor.factor)
        offset = 0
        for request in plan.requests:
            job: _Job = request.payload
            tops = top_k(logits[offset:offset + request.images], self.predictor.class_names, job.top_k)
            offset += request.images
            met = done <= request.deadline
            metrics.latency.observe(done - request.arrival)
            if not met:
                metrics.deadline_misses.inc()
            answer = {"skip": plan.skip, "chosen_by": plan.chosen_by, "budget_ms": job.budget_ms, "deadline_met": met,
                      "time_ms": {"decode": _ms(request.queued - request.arrival), "queue": _ms(start - request.queued),
                                  "compute": _ms(seconds), "total": _ms(done - request.arrival)},
                      "batch": batch_info,
                      "predictions": [{"file": name, "top": top} for name, top in zip(job.names, tops)]}
            _settle(job, answer)

    def _fail(self, requests: list[Pending], error: BaseException) -> None:
        self.metrics.batch_failures.inc()
        print(f"adn serve: a batch of {len(requests)} request(s) failed:", file=sys.stderr)
        traceback.print_exception(error, file=sys.stderr)
        failure = ApiError(500, "batch_failed", f"the batch this request ran in failed ({type(error).__name__}: "
                                                f"{str(error)[:300]}); the server keeps serving: retry, and report it "
                                                f"if it persists")
        for request in requests:
            _settle(request.payload, error=failure)


def _depths_to_prepare(settings: ServeSettings, table, n: int) -> list[str] | None:
    """None (every depth) or the table's depths with the super-net and the base-net, deepest first."""
    if settings.prepared_depths == "all":
        return None
    wanted = {str(SkipConfig(row["skip"], n)) for row in table.depths}
    wanted |= {str(SkipConfig.super_net(n)), str(SkipConfig.base_net(n))}
    return [str(c) for c in SkipConfig.all(n) if str(c) in wanted]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _settle(job: _Job, result: Any = None, error: BaseException | None = None) -> None:
    """Hand a result (or error) to the coroutine waiting in the event loop, from the worker thread."""
    def apply() -> None:
        if job.future.done():  # the caller went away (its task was cancelled)
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
    try:
        job.loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the event loop is closed: nobody is waiting any more
        pass

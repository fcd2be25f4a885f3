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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..core.skip import SkipConfig
from ..deploy.depth_table import DepthTable
from ..deploy.governor import Governor
from ..deploy.predict import Predictor, depth_table_for, top_k
from ..vision.preprocess import (
    DEFAULT_IMAGE_FORMATS,
    ImageError,
    ImageTooLarge,
    UnsupportedImageFormat,
    image_dimensions,
    image_formats,
)
from .batcher import Batcher, Draining, QueueFull
from .engine import Engine
from .errors import ApiError
from .logs import Throttle
from .metrics import Metrics
from .policy import BatchPolicy, Pending, Plan

MAX_BUDGET_MS = 600_000.0  # ten minutes: a budget beyond it is a typo, not a latency target
BATCH_WAITS = ("adaptive", "fixed")
# Decoding runs in a pool of its own, one request per thread: a few threads, so that decoding never takes every
# core from the batches, and one client's costly images never hold more than one of them.
DEFAULT_DECODE_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))


def check_number(
    flag: str, value, low: float, high: float, expected: str, *, low_open: bool = False, integer: bool = False
):
    """``value`` if it is a finite number (a whole one if ``integer``) in [``low``, ``high``] (``low`` excluded if
    ``low_open``); else a ValueError ``"<flag> <value>: expected <expected>"``, as every serve flag is checked."""
    kind = int if integer else (int, float)
    ok = (
        isinstance(value, kind)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if not ok:
        raise ValueError(f"{flag} {value}: expected {expected}")
    return value


@dataclass(frozen=True)
class ServeSettings:
    """The server's knobs; ``adn serve`` flags map one to one (``--max-batch`` -> ``max_batch``)."""

    budget_ms: float
    max_batch: int = 32  # images per batch (and per request)
    max_wait_ms: float = 5.0  # the longest the oldest request may wait for a fuller batch
    # "adaptive": a batch waits for a fuller one only while the recent arrival rate says that pays (never when
    # nothing is coming), at most max_wait_ms; "fixed": every batch that is not full waits max_wait_ms.
    batch_wait: str = "adaptive"
    max_queue: int = 256  # images queued; beyond, requests are refused with 503
    max_body_bytes: int = 16 << 20
    max_image_pixels: int = 40_000_000
    max_request_pixels: int = 100_000_000  # decoded pixels per request, all its images together
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS  # decoded; anything else is refused (415) before decoding
    decode_threads: int = DEFAULT_DECODE_THREADS
    top_k: int = 5
    quantile: str = "p99"
    backend: str = "eager"
    # Which depths to prepare at start-up: "all" 2^N, or "table" (the depth table's, plus the super-net and
    # the base-net, which requests fix most often). None: all on eager (a depth there is flags, free to
    # prepare) and on onnxruntime (one switchable session: a depth is an input), the table's on
    # onnxruntime-per-depth (each depth is an export and a session: seconds apiece).
    depths: str | None = None
    headroom: bool = True  # keep room for the requests expected within one budget (BatchPolicy)
    # Connections (adn.serve.connections): a complete request within request_timeout_s, idle connections closed after
    # keep_alive_s, at most max_connections open; at shutdown, requests in flight get graceful_timeout_s.
    request_timeout_s: float = 15.0
    keep_alive_s: float = 5.0
    max_connections: int = 512
    graceful_timeout_s: float = 30.0

    @property
    def prepared_depths(self) -> str:
        return self.depths or ("table" if self.backend == "onnxruntime-per-depth" else "all")

    def __post_init__(self):
        if self.batch_wait not in BATCH_WAITS:
            raise ValueError(f"--batch-wait {self.batch_wait}: expected {' or '.join(BATCH_WAITS)}")
        if self.depths not in (None, "all", "table"):
            raise ValueError(f"--depths {self.depths}: expected all or table")
        object.__setattr__(self, "image_formats", image_formats(self.image_formats))
        hour = 3600.0
        numbers = [  # flag, value, low, high, what is expected, low excluded, whole number
            (
                "--budget-ms",
                self.budget_ms,
                0,
                MAX_BUDGET_MS,
                f"a positive number of milliseconds, at most {MAX_BUDGET_MS:g}",
                True,
                False,
            ),
            ("--max-batch", self.max_batch, 1, 100_000, "a number of images from 1 to 100000", False, True),
            ("--max-wait-ms", self.max_wait_ms, 0, MAX_BUDGET_MS, "zero or more milliseconds", False, False),
            (
                "--max-queue",
                self.max_queue,
                self.max_batch,
                10**8,
                "at least --max-batch images (at most 10^8)",
                False,
                True,
            ),
            ("--max-body-mb", self.max_body_bytes, 1024, 64 << 30, "at least 0.001 MB (at most 65536)", False, True),
            ("--max-image-mpixels", self.max_image_pixels, 1, 10**10, "positive (at most 10000)", False, True),
            (
                "--max-request-mpixels",
                self.max_request_pixels,
                self.max_image_pixels,
                10**11,
                "at least --max-image-mpixels (at most 100000)",
                False,
                True,
            ),
            ("--decode-threads", self.decode_threads, 1, 256, "a number of threads from 1 to 256", False, True),
            ("--top-k", self.top_k, 1, 10**6, "a number of classes from 1 to 10^6", False, True),
            (
                "--request-timeout-s",
                self.request_timeout_s,
                0,
                hour,
                "a positive number of seconds, at most 3600",
                True,
                False,
            ),
            ("--keep-alive-s", self.keep_alive_s, 0, hour, "zero or more seconds, at most 3600", False, False),
            (
                "--max-connections",
                self.max_connections,
                1,
                10**6,
                "a number of connections from 1 to 10^6",
                False,
                True,
            ),
            (
                "--graceful-timeout-s",
                self.graceful_timeout_s,
                0,
                24 * hour,
                "zero or more seconds, at most 86400",
                False,
                False,
            ),
        ]
        for flag, value, low, high, expected, low_open, integer in numbers:
            check_number(flag, value, low, high, expected, low_open=low_open, integer=integer)


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
    def __init__(
        self,
        predictor: Predictor,
        governor: Governor,
        settings: ServeSettings,
        engine: Engine | None = None,
        clock=time.perf_counter,
    ):
        self.predictor, self.governor, self.settings, self.clock = predictor, governor, settings, clock
        self.metrics = Metrics(settings.budget_ms)
        self.throttle = Throttle()  # errors on stderr: each distinct one at most once per interval
        example = torch.zeros(1, *predictor.preprocessing.input_shape)
        self.engine = engine or Engine(predictor.net, example, self._depths_to_prepare(), backend=settings.backend)
        self._warm_up_decoding()
        self.policy = BatchPolicy(
            governor,
            settings.max_batch,
            settings.max_wait_ms / 1e3,
            settings.headroom,
            adaptive=settings.batch_wait == "adaptive",
        )
        self.batcher = Batcher(
            self.policy, self._execute, self._fail, settings.max_queue, clock, on_change=self.metrics.queue_changed
        )
        self._batch_ids = itertools.count(1)
        self._decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="adn-decode")

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike, settings: ServeSettings, table: str | os.PathLike | None = None
    ) -> Service:
        """Load the checkpoint and its depth table (default: depth_table.json next to it), prepare every depth."""
        predictor = Predictor.from_checkpoint(checkpoint)
        depth_table = depth_table_for(checkpoint, table, predictor.num_stages)
        return cls(predictor, Governor(depth_table, settings.budget_ms, settings.quantile), settings)

    @classmethod
    def from_export(
        cls, folder: str | os.PathLike, settings: ServeSettings, table: str | os.PathLike | None = None
    ) -> Service:
        """Serve a switchable export folder (``adn export --format onnx --switchable``) without the checkpoint: its
        ONNX file in one ONNX Runtime session, preprocessing and class names from its manifest, and the depth
        table ``table``, else the manifest's, else ``depth_table.json`` in the folder."""
        predictor, file, manifest = Predictor.from_export(folder)
        n = predictor.num_stages
        if table is None and isinstance(manifest.get("depth_table"), dict):
            depth_table = DepthTable.from_dict(manifest["depth_table"], source=f"{folder}/manifest.json's depth_table")
        elif table is None and not (Path(folder) / "depth_table.json").is_file():
            raise ValueError(
                f"--model-dir {folder}: the export carries no depth table; pass --table FILE (from adn "
                f"depth-table), or export with one next to the checkpoint (adn export --table FILE)"
            )
        else:
            depth_table = depth_table_for(Path(folder) / "manifest.json", table, n)
        governor = Governor(depth_table, settings.budget_ms, settings.quantile)
        example = torch.zeros(1, *predictor.preprocessing.input_shape)
        engine = Engine(
            None,
            example,
            _depths_to_prepare(settings, governor.table, n),
            backend=settings.backend,
            switchable_file=file,
            num_stages=n,
        )
        return cls(predictor, governor, settings, engine=engine)

    def _depths_to_prepare(self) -> list[str] | None:
        return _depths_to_prepare(self.settings, self.governor.table, self.predictor.num_stages)

    def _warm_up_decoding(self) -> None:
        """The first image of a format pays for loading PIL's decoder and building the transforms: here,
        not on a request."""
        for image_format in ("PNG", "JPEG"):
            if image_format in self.settings.image_formats:
                buffer = io.BytesIO()
                Image.new("RGB", (8, 8)).save(buffer, image_format)
                self.predictor.preprocessing.load(buffer.getvalue(), formats=self.settings.image_formats)

    # ----- life cycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()
        self._decoder.submit(lambda: None)  # a decoding thread starts now, not on the first request

    def begin_drain(self) -> None:
        """Stop taking requests; run the queued ones at once."""
        self.batcher.begin_drain()

    def close(self) -> None:
        """Answer everything queued, then stop the worker and the decoding threads."""
        self.batcher.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    # ----- what a request may ask ----------------------------------------------------------------------------
    def parse_skip(self, text: str | None) -> str | None:
        if text is None or not text.strip():
            return None
        try:
            skip = str(SkipConfig(text, self.predictor.num_stages))
        except ValueError as error:
            raise ApiError(
                400,
                "unknown_skip",
                f"skip {text!r} is not a depth of this network: {error} Leave skip out "
                f"to let the server choose the depth for the budget",
            ) from error
        if skip not in self.engine.skips:
            raise ApiError(
                400, "unknown_skip", f"depth {skip} is not served here; served: {', '.join(self.engine.skips)}"
            )
        return skip

    def parse_budget(self, text: str | None) -> float:
        if text is None or not text.strip():
            return self.settings.budget_ms
        try:
            budget = float(text)
        except ValueError:
            budget = math.nan
        if not (math.isfinite(budget) and 0 < budget <= MAX_BUDGET_MS):
            raise ApiError(
                400,
                "bad_budget",
                f"budget_ms {text!r}: give a positive number of milliseconds (at most "
                f"{MAX_BUDGET_MS:g}), such as 20; leave it out for the server's "
                f"{self.settings.budget_ms:g} ms",
            )
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
        """Decoded, resized and normalized images as one tensor; 400/413/415 for files that cannot be used. Every
        image's format and size are read from its header first: nothing is decoded when one of them is of a format
        not accepted, or when together they hold more pixels than a request may."""
        settings, preprocessing = self.settings, self.predictor.preprocessing
        named = [(f"file {name!r}", data) for name, data in files]
        try:
            pixels = 0
            for name, data in named:
                size = image_dimensions(data, name, settings.image_formats)
                preprocessing.check_size(size, name, settings.max_image_pixels)
                pixels += size[0] * size[1]
            if pixels > settings.max_request_pixels:
                raise ApiError(
                    413,
                    "too_many_pixels",
                    f"the request's {len(files)} image(s) hold {pixels / 1e6:.1f} "
                    f"Mpixels in all; this server decodes at most "
                    f"{settings.max_request_pixels / 1e6:.1f} Mpixels per request "
                    f"(adn serve --max-request-mpixels). Downscale them first (the "
                    f"network sees {preprocessing.image_size}x"
                    f"{preprocessing.image_size}), or send fewer per request",
                )
            return torch.stack(
                [
                    preprocessing.load(
                        data, name=name, max_pixels=settings.max_image_pixels, formats=settings.image_formats
                    )
                    for name, data in named
                ]
            )
        except ImageTooLarge as error:
            raise ApiError(413, "image_too_large", str(error)) from error
        except UnsupportedImageFormat as error:
            raise ApiError(415, "unsupported_image_format", str(error)) from error
        except ImageError as error:
            raise ApiError(400, "not_an_image", str(error)) from error

    async def decode(self, files: list[tuple[str, bytes]]) -> torch.Tensor:
        """:meth:`load_images` in the decoding pool (``decode_threads``), off the event loop: a request waits for a
        free thread, and one request never takes more than one."""
        return await asyncio.get_running_loop().run_in_executor(self._decoder, self.load_images, files)

    # ----- answering -----------------------------------------------------------------------------------------
    async def predict(
        self, images: torch.Tensor, names: list[str], skip: str | None, budget_ms: float, k: int, arrival: float
    ) -> dict:
        """Queue the images as one request and wait for its batch. Raises :class:`ApiError` (503 when the
        queue is full or the server is shutting down, 500 when its batch failed)."""
        loop = asyncio.get_running_loop()
        job = _Job(images, names, k, budget_ms, loop, loop.create_future())
        request = Pending(len(images), skip, arrival, arrival + budget_ms / 1e3, self.clock(), job)
        try:
            self.batcher.submit(request)
        except QueueFull as error:
            raise ApiError(
                503,
                "overloaded",
                f"the server is overloaded ({error}); retry in a moment, or send to another instance",
                headers={"Retry-After": "1"},
            ) from error
        except Draining as error:
            raise ApiError(
                503, "shutting_down", "the server is shutting down and takes no new requests; retry on another instance"
            ) from error
        return await job.future

    def describe(self) -> dict:
        """What GET /v1/depths answers: the depth table and how the server uses it."""
        return {
            "budget_ms": self.settings.budget_ms,
            "quantile": self.governor.quantile,
            "correction_factor": self.governor.factor,
            "backend": self.engine.backend,
            "max_batch": self.settings.max_batch,
            "max_wait_ms": self.settings.max_wait_ms,
            "batch_wait": self.settings.batch_wait,
            "skips": self.engine.skips,
            "table": self.governor.table.to_dict(),
        }

    def health(self) -> dict:
        return {
            "status": "draining" if self.batcher.draining else "ok",
            "model": self.predictor.meta["model"],
            "queue_length": len(self.batcher),
        }

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
            tops = top_k(logits[offset : offset + request.images], self.predictor.class_names, job.top_k)
            offset += request.images
            met = done <= request.deadline
            metrics.latency.observe(done - request.arrival)
            if not met:
                metrics.deadline_misses.inc()
            answer = {
                "skip": plan.skip,
                "chosen_by": plan.chosen_by,
                "budget_ms": job.budget_ms,
                "deadline_met": met,
                "time_ms": {
                    "decode": _ms(request.queued - request.arrival),
                    "queue": _ms(start - request.queued),
                    "compute": _ms(seconds),
                    "total": _ms(done - request.arrival),
                },
                "batch": batch_info,
                "predictions": [{"file": name, "top": top} for name, top in zip(job.names, tops)],
            }
            _settle(job, answer)

    def _fail(self, requests: list[Pending], error: BaseException) -> None:
        self.metrics.batch_failures.inc()
        self.throttle.exception(
            f"batch:{type(error).__name__}:{str(error)[:100]}", f"a batch of {len(requests)} request(s) failed:", error
        )
        failure = ApiError(
            500,
            "batch_failed",
            f"the batch this request ran in failed ({type(error).__name__}: "
            f"{str(error)[:300]}); the server keeps serving: retry, and report it "
            f"if it persists",
        )
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

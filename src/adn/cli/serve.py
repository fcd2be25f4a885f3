"""``adn serve``: an HTTP server for image classification whose depth follows a latency budget."""

from __future__ import annotations

import importlib.util
import sys

from ..vision.preprocess import DEFAULT_IMAGE_FORMATS
from .common import note_missing_depth_statistics, positive_int

LAYOUTS = {"switchable": ", one switchable ONNX Runtime session", "per-depth": ", one ONNX Runtime session per depth"}
NEEDS = {
    "starlette": "starlette",
    "uvicorn": "uvicorn",
    "prometheus_client": "prometheus_client",
    "multipart": "python-multipart",
}


def add(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP server: dynamic batching, depth chosen per batch to meet a latency budget",
        description="Serves POST /v1/predict (multipart field 'file'; several = a batch), GET /v1/depths, "
        "GET /healthz and GET /metrics (Prometheus). Requests are batched dynamically; "
        "adn.Governor picks each batch's depth from the time left before its earliest "
        "deadline, using the depth table, and learns from observed batch times. A request "
        "may fix its depth (field 'skip' or header X-ADN-Skip) or its own budget "
        "('budget_ms' or X-ADN-Budget-Ms). SIGTERM answers queued requests, then exits. "
        "Once it listens: curl -F file=@shoe.png http://127.0.0.1:8000/v1/predict "
        "(more in docs/serving.md)",
    )
    p.add_argument("--checkpoint", default=None, help="file written by adn train")
    p.add_argument(
        "--model-dir",
        default=None,
        metavar="DIR",
        help="instead of --checkpoint: a folder written by adn export --format onnx --switchable (the "
        "switchable .onnx and its manifest, with preprocessing, class names and, with adn export "
        "--table, the depth table), served on onnxruntime without the checkpoint; needs numpy, "
        "onnxruntime, pillow, torch (preprocessing) and the serve packages",
    )
    p.add_argument(
        "--budget-ms",
        type=float,
        required=True,
        metavar="B",
        help="latency budget of a request, from arrival to answer (requests may bring their own)",
    )
    p.add_argument(
        "--table",
        default=None,
        help="depth table from adn depth-table (default: depth_table.json next to "
        "the checkpoint; with --model-dir, the manifest's, else "
        "depth_table.json in the folder)",
    )
    p.add_argument(
        "--backend",
        default=None,
        choices=("eager", "onnxruntime", "onnxruntime-per-depth"),
        help="engine; depths are prepared at start-up, so switching depth never compiles or exports. "
        "onnxruntime: one switchable ONNX file in one session, the depth fed per batch (memory of "
        "about one network); onnxruntime-per-depth: one session per depth (a little faster per "
        "depth, a network's memory per depth). A model torch cannot export as one switchable file "
        "gets one session per depth on onnxruntime too, with a warning (default: eager with "
        "--checkpoint, onnxruntime with --model-dir)",
    )
    p.add_argument(
        "--depths",
        default=None,
        choices=("all", "table"),
        help="depths to prepare: all 2^N, or the depth table's plus the super-net and the base-net "
        "(default: "
        "all on eager and onnxruntime, where a depth is only flags or an input; table on "
        "onnxruntime-per-depth, where each depth is an export and a session); a request may fix only "
        "a prepared depth",
    )
    p.add_argument(
        "--quantile",
        default="p99",
        choices=("p50", "p99"),
        help="latency quantile of the table that must fit the time left",
    )
    p.add_argument("--max-batch", type=positive_int, default=32, help="images per batch (and per request)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="the longest the oldest queued request may wait for a fuller batch (never so long that the "
        "most accurate depth could no longer make its deadline); see --batch-wait for when it waits",
    )
    p.add_argument(
        "--batch-wait",
        default="adaptive",
        choices=("adaptive", "fixed"),
        help="adaptive: a batch leaves as soon as the worker is free, unless the recent arrival rate "
        "says the next request comes sooner than batching it would save (then it waits, at most "
        "--max-wait-ms): an idle server never waits. Requests that arrive while a batch runs go "
        "out together either way. fixed: every batch that is not full waits --max-wait-ms",
    )
    p.add_argument(
        "--no-headroom",
        dest="headroom",
        action="store_false",
        help="choose depths for the queued requests only; by default room is kept for the requests "
        "expected within one budget at the recent arrival rate, so that a deep batch does not "
        "make a burst late",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=256,
        help="images waiting at most; beyond, requests get 503 with Retry-After",
    )
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body accepted (413 beyond)")
    p.add_argument(
        "--max-image-mpixels",
        type=float,
        default=40.0,
        help="largest image accepted, in megapixels (read from its header, before decoding; 413 beyond)",
    )
    p.add_argument(
        "--max-request-mpixels",
        type=float,
        default=None,
        help="decoded pixels per request, all its images together, in megapixels (413 beyond, before "
        "anything is decoded; default: 100, or --max-image-mpixels if larger)",
    )
    p.add_argument(
        "--image-formats",
        default=",".join(DEFAULT_IMAGE_FORMATS).lower(),
        metavar="LIST",
        help="image formats decoded, comma-separated Pillow names; any other is refused (415) from its "
        "first bytes, before a decoder runs. Adding eps runs Ghostscript on what clients send",
    )
    p.add_argument(
        "--decode-threads",
        type=positive_int,
        default=None,
        help="threads decoding images, one request each, so that one client's costly images cannot "
        "take every core (default: half the CPUs, at most 4)",
    )
    p.add_argument(
        "--top-k",
        type=positive_int,
        default=5,
        help="classes per image in an answer (a request may ask for another number with field top_k)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one, printed at start)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=15.0,
        help="a client must send its complete request (headers and body) within this many seconds of "
        "connecting, or of the first byte of a later request on the connection; else 408 and the "
        "connection is closed",
    )
    p.add_argument(
        "--keep-alive-s",
        type=float,
        default=5.0,
        help="an idle connection between two requests is closed after this many seconds (0: after each answer)",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=512,
        help="connections open at once; a new one beyond takes the place of the one waiting longest for "
        "its request, or gets 503 when all have requests in progress (lowered, with a warning, when "
        "the open-file limit is lower)",
    )
    p.add_argument(
        "--graceful-timeout-s",
        type=float,
        default=30.0,
        help="at shutdown, how long to wait for requests in flight before cancelling them (they get 503)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request on stderr")
    p.set_defaults(run=run)


def run(args) -> int:
    missing = [package for module, package in NEEDS.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ValueError(f"adn serve needs {', '.join(missing)}: pip install 'adn[serve]'")
    if (args.checkpoint is None) == (args.model_dir is None):
        raise ValueError("give either --checkpoint FILE (a trained network) or --model-dir DIR (a switchable export)")
    if args.backend is None:
        args.backend = "eager" if args.checkpoint else "onnxruntime"
    if args.model_dir and args.backend != "onnxruntime":
        raise ValueError(
            f"--model-dir runs its switchable ONNX file on --backend onnxruntime, not {args.backend}; "
            f"serving on {args.backend} needs --checkpoint"
        )
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: give a port number in 0..65535 (0: any free one)")
    from ..serve import ServeSettings, Service, create_app
    from ..serve import server

    settings = ServeSettings(**_settings(args))
    sock = server.bind(args.host, args.port)  # before the slow start-up: a taken port fails at once
    print(
        f"adn serve: loading {args.checkpoint or args.model_dir}, preparing {settings.prepared_depths} depths on "
        f"{args.backend}",
        file=sys.stderr,
    )
    try:
        if args.model_dir:
            service = Service.from_export(args.model_dir, settings, args.table)
        else:
            service = Service.from_checkpoint(args.checkpoint, settings, args.table)
    except BaseException:
        sock.close()
        raise
    if service.predictor.net is not None:
        note_missing_depth_statistics(service.predictor.net, service.predictor.meta, args.checkpoint)
    measured_on = service.governor.table.meta.get("conditions", {}).get("backend")
    if measured_on and measured_on != args.backend:
        print(
            f"adn: warning: the depth table was measured on {measured_on}, the server runs {args.backend}: the "
            f"governor corrects the difference online, but a table measured with adn depth-table --backend "
            f"{args.backend} is right from the first request",
            file=sys.stderr,
        )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    table = service.governor.table
    print(
        f"adn serve: {service.predictor.meta['model']} ({service.predictor.num_stages} stages, "
        f"{len(service.engine.skips)} depths prepared in {service.engine.prepare_seconds:.1f} s"
        f"{LAYOUTS.get(service.engine.layout, '')}), "
        f"{len(table.depths)} depths in the table, budget {settings.budget_ms:g} ms ({settings.quantile}), "
        f"max batch {settings.max_batch}",
        file=sys.stderr,
    )
    print(
        f"adn serve: listening on http://{shown}:{port}  (POST /v1/predict, GET /v1/depths, /healthz, /metrics; "
        f"Ctrl-C or SIGTERM to stop)",
        file=sys.stderr,
        flush=True,
    )
    server.run(create_app(service), sock, settings, service.begin_drain, args.access_log)
    print("adn serve: stopped (the queue was drained)", file=sys.stderr)
    return 0


def _settings(args) -> dict:
    """The ServeSettings of the flags. The flags given in other units than the settings (megabytes, megapixels) are
    checked here, in their own units: finite, in range, each message naming its flag."""
    from ..serve.service import DEFAULT_DECODE_THREADS, check_number

    body_mb = check_number("--max-body-mb", args.max_body_mb, 0.001, 65536, "a number of megabytes from 0.001 to 65536")
    image_mp = check_number(
        "--max-image-mpixels", args.max_image_mpixels, 1e-6, 10_000, "a number of megapixels from 0.000001 to 10000"
    )
    request_mp = args.max_request_mpixels if args.max_request_mpixels is not None else max(100.0, image_mp)
    check_number(
        "--max-request-mpixels",
        request_mp,
        image_mp,
        100_000,
        f"a number of megapixels from --max-image-mpixels ({image_mp:g}) to 100000",
    )
    return dict(
        budget_ms=args.budget_ms,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        batch_wait=args.batch_wait,
        max_queue=args.max_queue,
        max_body_bytes=int(body_mb * 2**20),
        max_image_pixels=max(1, int(image_mp * 1e6)),
        max_request_pixels=int(request_mp * 1e6),
        image_formats=args.image_formats,
        decode_threads=args.decode_threads or DEFAULT_DECODE_THREADS,
        top_k=args.top_k,
        quantile=args.quantile,
        backend=args.backend,
        depths=args.depths,
        headroom=args.headroom,
        request_timeout_s=args.request_timeout_s,
        keep_alive_s=args.keep_alive_s,
        max_connections=args.max_connections,
        graceful_timeout_s=args.graceful_timeout_s,
    )

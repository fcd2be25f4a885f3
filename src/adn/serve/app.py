"""The HTTP side of ``adn serve``: a Starlette (ASGI) application over a :class:`~adn.serve.service.Service`.

    POST /v1/predict   multipart/form-data: one or more ``file`` fields (several = one batch), optional
                       ``skip`` (fix the depth), ``budget_ms`` (this request's budget), ``top_k``; the first
                       two also as headers X-ADN-Skip and X-ADN-Budget-Ms
    GET  /v1/depths    the depth table and how the server uses it
    GET  /healthz      {"status": "ok"}; 503 {"status": "draining"} while shutting down
    GET  /metrics      Prometheus text format

Every error is JSON, ``{"error": {"status", "code", "message"}}``, 4xx for what the client can fix; a request
still running when a graceful shutdown runs out of time gets a 503 (code ``shutting_down``), not uvicorn's
plain-text 500. The lifespan starts the batching worker and, at shutdown, answers everything still queued
before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import ApiError, error_body
from .service import Service

FIELDS = ("file", "skip", "budget_ms", "top_k")
HEADERS = {"skip": "X-ADN-Skip", "budget_ms": "X-ADN-Budget-Ms"}
CODES = {"skip": "bad_skip", "budget_ms": "bad_budget", "top_k": "bad_top_k"}  # error code per request option
CURL_HINT = "e.g. curl -F file=@image.png http://HOST:PORT/v1/predict"
_STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}


class BodyTooLarge(Exception):
    """The request body went past the limit while it was being read."""


def create_app(service: Service) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            # In a thread: the worker hands its last answers to this event loop, which must keep running.
            await run_in_threadpool(service.close)

    async def predict(request: Request) -> Response:
        arrival = service.clock()
        try:
            response = JSONResponse(await _predict(service, request, arrival))
        except ApiError as error:
            response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
        except Exception as error:  # noqa: BLE001 - a bug answers 500 JSON, and the server keeps serving
            service.throttle.exception(
                f"internal:{type(error).__name__}:{str(error)[:100]}",
                f"unexpected {type(error).__name__} answering a request:",
                error,
            )
            response = JSONResponse(
                error_body(
                    500, "internal_error", f"unexpected {type(error).__name__}: {str(error)[:300]}; please report it"
                ),
                status_code=500,
            )
        service.metrics.requests.labels(str(response.status_code)).inc()
        return response

    async def depths(request: Request) -> Response:
        return JSONResponse(service.describe())

    async def health(request: Request) -> Response:
        state = service.health()
        return JSONResponse(state, status_code=503 if state["status"] == "draining" else 200)

    async def metrics(request: Request) -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    async def http_error(request: Request, error: HTTPException) -> Response:
        code = _STATUS_CODES.get(error.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {error.detail}"
        if error.status_code in (404, 405):
            message += "; the endpoints are POST /v1/predict, GET /v1/depths, GET /healthz, GET /metrics"
        return JSONResponse(
            error_body(error.status_code, code, message),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    routes = [
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/v1/depths", depths, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
        middleware=[Middleware(AnswerWhenCancelled)],
    )


class AnswerWhenCancelled:
    """ASGI middleware: a request cancelled before its answer started (uvicorn cancels those still running when the
    graceful shutdown times out) gets the JSON 503 ``shutting_down``, not uvicorn's plain-text 500 and a traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if started:  # half an answer: uvicorn closes the connection
                return
            response = JSONResponse(
                error_body(
                    503,
                    "shutting_down",
                    "the server stopped before this request was "
                    "answered (it was still running when the "
                    "graceful-shutdown time, adn serve "
                    "--graceful-timeout-s, ran out); retry on "
                    "another instance",
                ),
                status_code=503,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)


async def _predict(service: Service, request: Request, arrival: float) -> dict:
    settings = service.settings
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type or 'none'}: send the image as "
            f"multipart/form-data in field 'file', {CURL_HINT}",
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
        raise _too_large(int(length), settings.max_body_bytes)
    body = LimitedBody(request.receive, settings.max_body_bytes)
    limited = Request(request.scope, body)
    try:
        async with limited.form(max_files=settings.max_batch, max_fields=len(FIELDS) + 8) as form:
            if not body.complete(content_type):
                raise ApiError(
                    400,
                    "truncated_body",
                    f"the multipart body ends after {body.received} bytes, before "
                    f"its closing boundary: the upload was cut short. Send the "
                    f"whole request again, {CURL_HINT}",
                )
            unknown = sorted(set(form.keys()) - set(FIELDS))
            if unknown:
                raise ApiError(
                    400,
                    "unknown_field",
                    f"unknown form field(s) {', '.join(map(repr, unknown))}; the fields are {', '.join(FIELDS)}",
                )
            uploads = form.getlist("file")
            if not uploads:
                raise ApiError(400, "no_image", f"no image: send it as multipart/form-data field 'file', {CURL_HINT}")
            files = []
            for index, upload in enumerate(uploads):
                if not isinstance(upload, UploadFile):
                    raise ApiError(
                        400,
                        "no_image",
                        f"field 'file' #{index + 1} is text, not a file upload; "
                        f"{CURL_HINT} (with @ before the file name)",
                    )
                files.append((upload.filename or f"file{index + 1}", await upload.read()))
            options = {name: _option(form, request, name) for name in ("skip", "budget_ms")}
            top_k = _single(form, "top_k")
    except BodyTooLarge:
        raise _too_large(None, settings.max_body_bytes) from None
    except HTTPException as error:  # Starlette's word for malformed multipart data (too many files, ...)
        detail = str(error.detail)
        if "Too many files" in detail:
            raise ApiError(
                400,
                "too_many_images",
                f"{detail} This server takes at most {settings.max_batch} images "
                f"per request (adn serve --max-batch); split the request",
            ) from None
        raise ApiError(
            400, "malformed_request", f"the multipart body cannot be parsed ({detail}); {CURL_HINT}"
        ) from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away before sending the whole body") from None
    skip = service.parse_skip(options["skip"])
    budget_ms = service.parse_budget(options["budget_ms"])
    k = service.parse_top_k(top_k)
    images = await service.decode(files)  # CPU work: in the decoding threads, off the event loop
    return await service.predict(images, [name for name, _ in files], skip, budget_ms, k, arrival)


def _single(form, name: str) -> str | None:
    values = form.getlist(name)
    if len(values) > 1:
        raise ApiError(400, CODES[name], f"field {name!r} is given {len(values)} times; give it once")
    if values and not isinstance(values[0], str):
        raise ApiError(400, CODES[name], f"field {name!r} must be text, not a file")
    return values[0] if values else None


def _option(form, request: Request, name: str) -> str | None:
    """A request option from its form field or its header (each given once at most); both must agree when both are
    given."""
    field, headers = _single(form, name), request.headers.getlist(HEADERS[name])
    if len(headers) > 1:
        raise ApiError(400, CODES[name], f"header {HEADERS[name]} is given {len(headers)} times; give it once")
    header = headers[0] if headers else None
    if field is not None and header is not None and field.strip() != header.strip():
        raise ApiError(
            400, CODES[name], f"{name} is {field!r} in the form but {header!r} in header {HEADERS[name]}; give one"
        )
    return field if field is not None else header


class LimitedBody:
    """``receive`` that raises :class:`BodyTooLarge` once more than ``limit`` body bytes have arrived (a
    chunked upload has no Content-Length to check up front), and keeps the body's last bytes: the
    multipart parser accepts a body cut off before its closing boundary, which would otherwise be
    reported as a request without an image."""

    TAIL = 512

    def __init__(self, receive, limit: int):
        self.receive, self.limit = receive, limit
        self.received, self.tail = 0, b""

    async def __call__(self):
        message = await self.receive()
        if message["type"] == "http.request":
            body = message.get("body", b"")
            self.received += len(body)
            if self.received > self.limit:
                raise BodyTooLarge()
            self.tail = (self.tail + body)[-self.TAIL :]
        return message

    def complete(self, content_type: str) -> bool:
        """Whether the body ended with the closing boundary that ``content_type`` names (True when it names
        none: the parser has refused such a body already)."""
        boundary = next(
            (
                part.split("=", 1)[1].strip().strip('"')
                for part in content_type.split(";")[1:]
                if part.strip().lower().startswith("boundary=")
            ),
            None,
        )
        return not boundary or f"--{boundary}--".encode("latin-1", "replace") in self.tail


def _too_large(length: int | None, limit: int) -> ApiError:
    size = f"{length / 2**20:.1f} MB" if length is not None else "more"
    return ApiError(
        413,
        "body_too_large",
        f"the request body is {size}; this server accepts at most "
        f"{limit / 2**20:.1f} MB (adn serve --max-body-mb). Send fewer or smaller "
        f"images",
    )

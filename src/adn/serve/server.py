"""Running the app on uvicorn, with a graceful shutdown that answers every queued request.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the requests in flight; the
service is told at once (``on_exit``), so that it refuses new requests and runs what is queued without
waiting for fuller batches; the lifespan's shutdown then drains whatever is left before the process exits.

Connections are guarded by :mod:`adn.serve.connections` (a deadline for receiving each request, a cap on open
connections; uvicorn's own ``timeout_keep_alive`` for idle ones), and what goes wrong is logged on throttled
lines (:mod:`adn.serve.logs`): the event loop's errors, uvicorn's warnings and the server's own events.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable

import uvicorn

from .connections import fit_to_open_files, protocol_class
from .logs import Throttle, ThrottledLogs, loop_exception_handler
from .service import ServeSettings

FILES_HINT = "lower --max-connections, or raise the open-file limit: ulimit -n"


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the service when a shutdown signal arrives, with throttled error logs."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None], throttle: Throttle):
        super().__init__(config)
        self._on_exit, self.throttle = on_exit, throttle

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(loop_exception_handler(self.throttle, FILES_HINT))
        logger, throttled = logging.getLogger("uvicorn.error"), ThrottledLogs(self.throttle)
        logger.addFilter(throttled)
        try:
            await super().serve(sockets=sockets)
        finally:
            logger.removeFilter(throttled)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        # A signal handler runs in the main thread between two bytecodes, maybe inside the service's lock:
        # hand the call to the event loop instead of making it here.
        try:
            asyncio.get_running_loop().call_soon_threadsafe(self._on_exit)
        except RuntimeError:  # no loop running (not started yet): nothing is queued
            self._on_exit()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one; read it with ``getsockname()``). Binding
    before uvicorn starts means the address is known, and taken, before the slow start-up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections whose socket says TCP. With it on, a response written in two parts (headers, body) waits
    # for the client's delayed ACK: 40 ms on every keep-alive request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        return sock
    except OSError as error:
        sock.close()
        raise ValueError(
            f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port "
            f"(0 picks a free one) or --host"
        ) from error


def make_server(
    app,
    settings: ServeSettings,
    on_exit: Callable[[], None],
    access_log: bool = False,
    log_level: str = "warning",
    max_connections: int | None = None,
    throttle: Throttle | None = None,
) -> _DrainingServer:
    """The uvicorn server for ``app`` with the connection limits of ``settings`` (``max_connections`` overrides
    ``settings.max_connections``); ``server.run(sockets=[sock])`` serves until ``server.should_exit``."""
    throttle = throttle or Throttle()
    http = protocol_class(settings.request_timeout_s, max_connections or settings.max_connections, throttle)
    config = uvicorn.Config(
        app,
        lifespan="on",
        access_log=access_log,
        log_level=log_level,
        http=http,
        ws="none",
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.graceful_timeout_s,
    )
    return _DrainingServer(config, on_exit, throttle)


def run(
    app, sock: socket.socket, settings: ServeSettings, on_exit: Callable[[], None], access_log: bool = False
) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT, then shut down gracefully (at most
    ``settings.graceful_timeout_s`` seconds of waiting for requests in flight)."""
    max_connections = fit_to_open_files(settings.max_connections, lambda line: print(line, file=sys.stderr))
    server = make_server(app, settings, on_exit, access_log, max_connections=max_connections)
    # After its graceful shutdown uvicorn raises the signal it caught once more, with the handlers that were
    # in place before it started. SIGTERM would then kill the process (status -15), Ctrl-C raise
    # KeyboardInterrupt, although everything was answered: handlers that ignore them let it end normally.
    stopping = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in stopping}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

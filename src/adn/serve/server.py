"""Running the app on uvicorn, with a graceful shutdown that answers every queued request.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the requests in flight; the
service is told at once (``on_exit``), so that it refuses new requests and runs what is queued without
waiting for fuller batches; the lifespan's shutdown then drains whatever is left before the process exits.
"""
from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable

import uvicorn


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the service when a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit

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
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port "
                         f"(0 picks a free one) or --host") from error


def run(app, sock: socket.socket, on_exit: Callable[[], None], graceful_timeout_s: float = 30.0,
        access_log: bool = False, log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT, then shut down gracefully (at most
    ``graceful_timeout_s`` seconds of waiting for requests in flight)."""
    config = uvicorn.Config(app, lifespan="on", access_log=access_log, log_level=log_level,
                            timeout_graceful_shutdown=graceful_timeout_s)
    # After its graceful shutdown uvicorn raises the signal it caught once more, with the handlers that were
    # in place before it started. SIGTERM would then kill the process (status -15), Ctrl-C raise
    # KeyboardInterrupt, although everything was answered: handlers that ignore them let it end normally.
    stopping = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in stopping}
    try:
        _DrainingServer(config, on_exit).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

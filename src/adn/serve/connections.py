"""The connections of ``adn serve``: how long a client may take to send its request, and how many connections may
be open at once.

uvicorn bounds neither. Its ``timeout_keep_alive`` (``--keep-alive-s``) closes a connection that stays idle between
two requests, and is what this server uses for that; but it restarts at every byte received, so a client sending
one header byte every second holds a connection (and a file descriptor) for ever, and a fresh connection that sends
nothing is never closed. Its ``limit_concurrency`` answers plain-text 503s only once a complete request has
arrived, and counts idle connections against the limit: it neither caps open connections nor helps against slow
clients. So :func:`protocol_class` extends uvicorn's h11 protocol with:

- **a deadline for receiving a complete request** (``--request-timeout-s``): from the connection's start for its
  first request, from the first byte of each later one (keep-alive idleness in between is uvicorn's
  ``timeout_keep_alive``), until the last byte of its body. A client that misses it gets a JSON 408 (code
  ``request_timeout``) and its connection is closed; one that sent nothing is closed silently.
- **a cap on open connections** (``--max-connections``). At the cap, a new connection takes the place of the
  connection that has been waiting longest for its request (idle between requests, or still sending one; the
  latter gets a JSON 503, code ``too_many_connections``): slow or idle clients cannot lock out the others. When every
  open connection has a request in progress, the new one gets the JSON 503 and is closed.

Every such event is logged on one throttled line (:mod:`adn.serve.logs`), never per connection.
"""

from __future__ import annotations

import asyncio
import http
import json
import os
import time
from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body
from .logs import Throttle

LINGER_S = 1.0  # after an error answer, how long the rest of what the client sends is read (and dropped)
LINGER_MAX = 32  # connections lingering so at once, at most (each holds a file descriptor); beyond, closed at once
RESERVED_FILES = 128  # file descriptors kept for everything but connections (lingering ones, temporary upload files)


class _Registry:
    """The open connections of one server, and who makes room for whom at the cap."""

    def __init__(self, max_connections: int):
        self.max_connections = max_connections
        self.open: dict[GuardedH11Protocol, None] = {}
        self.lingering = 0  # answered with an error, closing: no longer counted in ``open``

    def admit(self, protocol: GuardedH11Protocol) -> bool:
        if len(self.open) >= self.max_connections:
            waiting = [p for p in self.open if p.waiting_since is not None]
            if not waiting:
                return False
            min(waiting, key=lambda p: p.waiting_since).evict()
        self.open[protocol] = None
        return True

    def forget(self, protocol: GuardedH11Protocol) -> None:
        self.open.pop(protocol, None)


def error_response(status: int, code: str, message: str, retry_after: bool = False) -> bytes:
    """A complete HTTP/1.1 answer with the server's JSON error body, closing the connection."""
    body = json.dumps(error_body(status, code, message)).encode()
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n" + ("retry-after: 1\r\n" if retry_after else "")
    )
    return head.encode("latin-1") + b"\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request and a cap on open connections; made by
    :func:`protocol_class`, which sets the class attributes below."""

    registry: _Registry
    request_timeout_s: float
    throttle: Throttle
    clock: Callable[[], float] = time.monotonic

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.waiting_since: float | None = None  # when it began waiting for a request; None while one is handled
        self._deadline: asyncio.TimerHandle | None = None
        self._answered = None  # the request cycle answered last (uvicorn keeps it until the next one)
        self._closing = False  # answered with an error: what the client still sends is dropped
        self._linger: asyncio.TimerHandle | None = None  # set while lingering (counted by the registry)
        self._own_transport: asyncio.Transport | None = None  # a refused connection's (uvicorn never sees it)

    # ----- asyncio's protocol interface ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        if not self.registry.admit(self):
            self._refuse(transport)
            return
        super().connection_made(transport)
        self.waiting_since = self.clock()
        self._arm()  # uvicorn times idleness only after a first answer: a connection that sends nothing is held

    def data_received(self, data: bytes) -> None:
        if self._closing or self._own_transport is not None or self.transport.is_closing():
            return  # the answer is given; the rest is read only so that the client gets it (no reset)
        if self.waiting_since is not None and self._deadline is None:  # the first bytes after a keep-alive pause
            self._arm()
        super().data_received(data)
        self._check_received()

    def eof_received(self) -> bool | None:
        return None  # the transport closes (uvicorn's own answer, made explicit)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            self.registry.lingering -= 1
        if self._own_transport is not None:
            return
        self.registry.forget(self)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        if self._own_transport is None:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._own_transport is None:
            super().resume_writing()

    # ----- uvicorn's hooks ------------------------------------------------------------------------------------------
    def on_response_complete(self) -> None:
        self._answered = self.cycle
        self.waiting_since = self.clock()
        self._disarm()
        super().on_response_complete()
        if self._request_started():  # a pipelined request began with what was already received
            self._arm()
            self._check_received()

    # ----- the deadline and the cap ----------------------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_started(self) -> bool:
        """The request's headers have arrived (uvicorn made a cycle for it, and the app runs)."""
        return self.cycle is not None and self.cycle is not self._answered

    def _partial_request(self) -> bool:
        """Part of a request not answered yet has arrived: its headers, or the first bytes of them."""
        return self._request_started() or (self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0]))

    def _check_received(self) -> None:
        """Once the whole request (headers and body) is in, no deadline runs until it is answered. Once the rest of
        the body of a request answered early (a 413 before the body was read) has been read and dropped, the
        connection is idle again: keep-alive times it, as after any answer."""
        if self.waiting_since is None:
            return
        if self._request_started():
            if not self.cycle.more_body:
                self._disarm()
                self.waiting_since = None
        elif self._answered is not None and not self._partial_request() and self.conn.their_state is h11.IDLE:
            self._disarm()
            if self.timeout_keep_alive_task is None and not self.transport.is_closing():
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        timeout = f"{self.request_timeout_s:g} s"
        if self._abandon(
            408,
            "request_timeout",
            f"the request did not arrive in full within {timeout} of "
            f"{'its first byte' if self._answered else 'connecting'}; send "
            f"the whole request at once (adn serve --request-timeout-s)",
        ):
            self.throttle(
                "request_timeout",
                f"answered 408 to a client that did not send a complete request within "
                f"{timeout} (--request-timeout-s), and closed its connection",
            )

    def evict(self) -> None:
        """Make room for a new connection: close this one, which is waiting for (the rest of) a request."""
        limit = self.registry.max_connections
        answered = self._abandon(
            503,
            "too_many_connections",
            f"the server has {limit} connections open (adn serve --max-connections) and closed "
            f"this one, which had not sent a complete request, to make room for another; "
            f"retry, sending the whole request at once",
            retry_after=True,
        )
        self.throttle(
            "evicted",
            f"{limit} connections open (--max-connections): closed the one waiting longest for "
            f"its request{' (answered 503)' if answered else ''} to make room for a new one",
        )

    def _abandon(self, status: int, code: str, message: str, retry_after: bool = False) -> bool:
        """Close the connection; with the JSON error first when a request is partly received and not answered.
        True if the error was sent. Either way the connection no longer counts against the cap."""
        self.registry.forget(self)
        self._disarm()
        self.waiting_since = None
        cycle = self.cycle
        if self._closing:
            self.transport.close()
            return False
        if self._request_started():
            if cycle.response_started:  # the app answered before reading the whole body: nothing to add
                self.transport.close()
                return False
            cycle.disconnected = True  # the app's receive() gets http.disconnect; its answer goes nowhere
            cycle.message_event.set()
        elif not self._partial_request():
            # Nothing of a new request arrived (an idle or fresh connection), or the client is still sending the
            # body of a request already answered: close, as uvicorn does an idle connection.
            self.transport.close()
            return False
        self._closing = True
        self._answer_and_close(self.transport, error_response(status, code, message, retry_after))
        return True

    def _refuse(self, transport) -> None:
        """Every connection busy at the cap: a JSON 503 on this new one, which is then closed."""
        self._own_transport = transport
        limit = self.registry.max_connections
        self._answer_and_close(
            transport,
            error_response(
                503,
                "too_many_connections",
                f"the server has {limit} connections open, each with a request in progress "
                f"(adn serve --max-connections); retry in a moment",
                retry_after=True,
            ),
        )
        self.throttle(
            "refused",
            f"{limit} connections open (--max-connections), all with requests in progress: refused a new one with 503",
        )

    def _answer_and_close(self, transport, answer: bytes) -> None:
        """Write ``answer``, end the sending side, and close once the client has closed its side or after
        :data:`LINGER_S`: closing at once with unread data would reset the connection and could lose the answer."""
        transport.write(answer)
        if self.registry.lingering >= LINGER_MAX:  # under a flood, file descriptors come first
            transport.close()
            return
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):  # already closing, or a transport without half-close
            transport.close()
            return
        self.registry.lingering += 1
        self._linger = self.loop.call_later(LINGER_S, transport.close)


def protocol_class(request_timeout_s: float, max_connections: int, throttle: Throttle) -> type[GuardedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)``, with its own registry of open connections (one per
    server)."""
    return type(
        "AdnH11Protocol",
        (GuardedH11Protocol,),
        {"registry": _Registry(max_connections), "request_timeout_s": request_timeout_s, "throttle": throttle},
    )


def fit_to_open_files(max_connections: int, warn: Callable[[str], None]) -> int:
    """``max_connections``, or fewer when the process may not open that many files: the soft limit is raised
    towards the hard one if needed; if that is not enough, the cap is lowered, with a warning. Without it, the
    connections past the limit make every ``accept()`` fail ("Too many open files") and nothing is answered."""
    try:
        import resource
    except ImportError:  # not on Unix
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 32
    needed = max_connections + in_use + RESERVED_FILES
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_connections
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft >= needed:
        return max_connections
    allowed = max(1, soft - in_use - RESERVED_FILES)
    warn(
        f"adn: warning: the open-file limit ({soft}, ulimit -n) leaves room for {allowed} connections, not "
        f"--max-connections {max_connections}; serving at most {allowed}. Raise the limit (ulimit -n "
        f"{needed}) to serve more"
    )
    return allowed

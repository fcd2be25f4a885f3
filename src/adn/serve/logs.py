"""What the server writes on stderr when something goes wrong: one line per distinct failure, at most once per
interval, with a count of the ones left out. A flood of bad clients (timeouts, refused connections, "Too many open
files" at every accept) must not become a flood of tracebacks that fills the disk and hides everything else.

Three sources go through it: the server's own events (:class:`Throttle`), the event loop's exception handler
(:func:`loop_exception_handler`: one line, no traceback, for errors such as ``accept()`` failing with EMFILE) and
uvicorn's loggers (:class:`ThrottledLogs`, a logging filter).
"""

from __future__ import annotations

import errno
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

INTERVAL_S = 10.0
PREFIX = "adn serve: "


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Throttle:
    """``throttle(key, message)`` writes ``message`` unless a message of the same ``key`` was written less than
    ``interval_s`` ago; the next one written says how many were left out meanwhile. Thread-safe."""

    def __init__(
        self,
        interval_s: float = INTERVAL_S,
        write: Callable[[str], None] = _stderr,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.interval_s, self.write, self.clock = interval_s, write, clock
        self._last: dict[str, tuple[float, int]] = {}  # key -> (when last written, how many left out since)
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """None when a message of ``key`` must be left out now (counted); else how many were left out before it."""
        now = self.clock()
        with self._lock:
            last, left_out = self._last.get(key, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._last[key] = (last, left_out + 1)
                return None
            self._last[key] = (now, 0)
            return left_out

    def __call__(self, key: str, message: str, detail: str | None = None) -> bool:
        """Write ``message`` (and ``detail``, e.g. a traceback, below it) unless throttled; True if written."""
        left_out = self.allow(key)
        if left_out is None:
            return False
        self.write(PREFIX + message + _more(left_out, self.interval_s) + (f"\n{detail.rstrip()}" if detail else ""))
        return True

    def exception(self, key: str, message: str, error: BaseException) -> bool:
        """``message`` with the traceback of ``error``, throttled as one key."""
        return self(key, message, "".join(traceback.format_exception(error)))


def _more(left_out: int, interval_s: float) -> str:
    return f" ({left_out} more like it left out of the log in the last {interval_s:g} s or more)" if left_out else ""


def loop_exception_handler(throttle: Throttle, hint: str = "") -> Callable:
    """An asyncio exception handler writing one throttled line per kind of error, without a traceback.
    ``hint`` is added to the line of an out-of-file-descriptors error (what to change)."""

    def handle(loop, context: dict) -> None:
        error = context.get("exception")
        message = context.get("message") or "error in the event loop"
        number = getattr(error, "errno", None)
        key = f"loop:{message}:{type(error).__name__}:{number}"
        line = f"{message}: {type(error).__name__}: {error}" if error is not None else message
        if number in (errno.EMFILE, errno.ENFILE):
            line += "; new connections wait until some close" + (f" ({hint})" if hint else "")
        throttle(key, line)

    return handle


class ThrottledLogs(logging.Filter):
    """A filter for uvicorn's loggers: each distinct message at most once per interval (tracebacks included),
    the next one saying how many were left out."""

    def __init__(self, throttle: Throttle):
        super().__init__()
        self.throttle = throttle

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        left_out = self.throttle.allow(f"log:{record.name}:{record.msg}")
        if left_out is None:
            return False
        if left_out:
            record.msg, record.args = record.getMessage() + _more(left_out, self.throttle.interval_s), None
        return True

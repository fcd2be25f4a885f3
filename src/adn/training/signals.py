"""Ctrl-C and SIGTERM ask a run to stop cleanly: the loop saves a resumable checkpoint first."""

from __future__ import annotations

import signal
import threading
from typing import Self


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM only ask the run to stop: the loop notices
    at the next step, saves a mid-epoch checkpoint and raises :class:`TrainingInterrupted`. Ctrl-C used to
    lose the whole epoch. A second signal interrupts at once (KeyboardInterrupt; the last checkpoint is
    whole either way, since checkpoints are replaced atomically)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._saved: dict = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for signum in self.SIGNALS:
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()

    def _handle(self, signum, frame) -> None:
        # No printing here: the handler may run in the middle of another print to stderr.
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group; the training process saves a
    checkpoint and stops its workers itself, so a worker must not die of it first (the loader would fail)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

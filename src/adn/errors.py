"""The errors a user can act on, and the one helper that shortens them.

Each message says what was wrong, what was expected and how to fix it. ``adn``'s command line turns
these into one ``adn: error: ...`` line (exit status 2), and it imports only this module at start-up to
know them, not the modules that raise them.
"""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model; the message says which."""


class DataError(ValueError):
    """A dataset could not be found or read; the message says what to do."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after it saved the steps done (``checkpoint``, or None if nothing
    needed saving); the command line turns it into a message saying how to resume."""

    def __init__(self, message: str, signum: int, checkpoint: Path | None):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line (torch's messages run to pages); its type's name when
    the message is empty (a zero-byte file's error is)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__

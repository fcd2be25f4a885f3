"""Where a classification run stands inside an epoch, and the checks a checkpoint's position passes before
a run resumes from it (a checkpoint is input: it may be damaged or altered)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import CheckpointError
from ..training import rng


@dataclass
class EpochProgress:
    """Where the current epoch stands. Mid-epoch checkpoints hold it, so that a resumed epoch skips the
    batches already trained on and its metrics still cover every step of the epoch."""

    steps: int = 0
    seen: int = 0
    skipped_images: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # CPU time of this process (all its threads): unlike wall time, it does not grow while the process
    # is paused or waits for a core another process holds, so it measures the compute a run really took.
    cpu_seconds: float = 0.0
    global_batch: int = 0  # images per step over all processes; a mid-epoch resume needs the same


MAX_EPOCHS = 1_000_000  # a bound on positions read from checkpoints (the schedule is replayed epoch by epoch)


def check_position(resume: dict, source) -> None:
    """The position fields of a checkpoint to resume from, before anything loops over them."""

    def bad(key: str, expected: str):
        raise CheckpointError(
            f"cannot resume from {source}: {key} = {str(resume.get(key))[:80]}, expected {expected}; "
            f"it was not written by adn train or was altered"
        )

    def count(value, high=2**62) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high

    if not count(resume.get("epoch"), MAX_EPOCHS):
        bad("epoch", f"an epoch number in [0, {MAX_EPOCHS}]")
    if "global_step" in resume and not count(resume["global_step"]):
        bad("global_step", "a step count")
    step = resume.get("step_in_epoch")
    if step is not None:
        if not count(step):
            bad("step_in_epoch", "a step count or null")
        progress = resume.get("progress")
        names = {f.name for f in fields(EpochProgress)}
        if not isinstance(progress, dict) or not set(progress) <= names:
            bad("progress", f"a dict with keys among {sorted(names)}")
    if not isinstance(resume.get("optimizer"), dict):
        bad("optimizer", "an optimizer state dict")


def restore_rng(state, source) -> None:
    try:
        rng.restore(state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise CheckpointError(
            f"cannot resume from {source}: its RNG state is malformed ({type(error).__name__}); it "
            f"was not written by adn train or was altered"
        ) from error

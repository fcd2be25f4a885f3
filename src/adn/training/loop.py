"""The run loop every training command shares; classification, detection and language models plug in as tasks.

:class:`RunLoop` owns what a run needs whatever it trains (the split of timm's ``task/`` and PEFT's
``BaseTuner``: a loop that does not know the task, a task that does not know the run):

- the output folder: locked for the run (a folder another live run holds is refused, and nothing in it
  changes), another run's files refused unless resuming or ``--overwrite``, temporaries of a killed run
  removed, and on resume the log cut back to the checkpoint (:mod:`adn.training.run_folder`);
- Ctrl-C and SIGTERM (:class:`StopSignals`): the steps done are saved in a resumable checkpoint, then
  :class:`TrainingInterrupted` is raised; with several processes all stop after the same step (they agree
  in one small all-reduce per step, or in the task's own: :meth:`RunLoop.asked`, :meth:`RunLoop.agree`);
- finite checks: a non-finite loss stops the run with :class:`TrainingDiverged` naming the step (before the
  optimizer applies it), and the weights are checked before every save, so no non-finite checkpoint is
  ever written;
- ``log.jsonl`` (:mod:`adn.training.run_log`), checkpoint rotation (:func:`save_rotating`), the progress
  bar, and releasing the folder however the run ends.

A :class:`Task` supplies the rest: its periods (epochs; a step-based task has one), their batches, the
step (forward and backward, then the update), log records and checkpoint payloads.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from ..errors import TrainingDiverged, TrainingInterrupted
from ..utils.checkpoint_file import LATEST
from .distributed import Distributed
from .run_folder import LOG_NAME, RunLock, check_writable, claim, remove_stale_temporaries, save_rotating
from .run_log import append_log, reconcile_log
from .signals import StopSignals


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Period:
    """One period of a task (an epoch): the batches still to train and how the progress bar shows them."""

    batches: Iterable
    total: int | None = None  # steps of the whole period
    done: int = 0  # steps already trained (a period resumed in the middle)
    label: str = ""


@dataclass
class Checkpoint:
    """What a task saves: the payload, and the position that names its numbered copy (both from 1)."""

    payload: dict
    epoch: int
    step: int


@dataclass
class Resumed:
    """Where a resumed run starts: the log keeps the records up to ``position`` (of the task's
    ``log_key``), plus ``last`` if the run died between writing the checkpoint and its log line."""

    position: int
    last: dict | None = None


class Task(Protocol):
    """A training task as :class:`RunLoop` sees it. Every method runs on every process (those that
    communicate must); the loop writes files on rank 0 only."""

    module: nn.Module  # the weights checked before every save
    log_key: str  # the field of log records that orders them ("epoch" or "step")
    advice: str  # what to try when the loss diverges, e.g. "try a lower --lr"

    def resumed(self) -> Resumed | None:
        """Where a resumed run starts, or None for a fresh run."""

    def start(self) -> dict | None:
        """Before the first step: a log record (an evaluation of the starting point) or None."""

    def periods(self) -> Iterable[int]:
        """The periods still to train."""

    def period(self, index: int) -> Period:
        """The batches of one period (the rest of it, when resumed in the middle)."""

    def step(self, batch) -> dict[str, float] | None:
        """Forward and backward on one batch; the loss terms averaged over processes (``loss`` among
        them), or None when there was nothing to train on. No optimizer update yet. A task that sums
        numbers over the processes here anyway may add :meth:`RunLoop.asked` to them and hand the sum to
        :meth:`RunLoop.agree`, which spares the loop its own all-reduce for the stop request."""

    def update(self, terms: dict[str, float]) -> dict | None:
        """The optimizer update after a finite loss, and the bookkeeping; a log record or None."""

    def save_due(self) -> bool:
        """Whether a checkpoint within the period is due after this step."""

    def end_period(self, index: int) -> dict | None:
        """The period's log record (evaluated), or None; its checkpoint follows."""

    def where(self, pending: bool) -> str:
        """The position for messages, e.g. 'at epoch 2, step 5 of 10'; ``pending``: the step being taken."""

    def checkpoint(self, record: dict | None) -> Checkpoint | None:
        """The checkpoint of the current position (``record``: a period's end); None on processes
        other than rank 0 (after taking part in any gathering)."""


class RunLoop:
    """Runs a :class:`Task` in an output folder. Build the task first (a failed set-up leaves no folder
    behind; call :func:`check_output_dir` before slow set-up), then :meth:`run`."""

    def __init__(
        self,
        task: Task,
        output_dir: str | os.PathLike,
        *,
        world: Distributed | None = None,
        resume: str | None = None,
        overwrite: bool = False,
        keep_checkpoints: int = 0,
        progress: bool = True,
        log: Callable[[str], None] = say,
    ):
        self.task, self.output, self.world = task, Path(output_dir), world or Distributed()
        self.resume, self.overwrite, self.keep_checkpoints = resume, overwrite, keep_checkpoints
        self.progress, self.log = progress, log
        self.stop = StopSignals()
        self.lock: RunLock | None = None  # rank 0's hold on the folder
        self.claimed = False  # every process: claim() ran (it is collective, so it runs once)
        self.agreed: float | None = None  # a task's sum of asked() over the processes, this step

    @classmethod
    def of(cls, task: Task, cfg, **options) -> RunLoop:
        """The loop of a run set by ``cfg``: the run flags every training command shares (``output_dir``,
        ``resume``, ``overwrite``, ``keep_checkpoints``, ``progress``); ``options``: ``world``, ``log``."""
        return cls(
            task,
            cfg.output_dir,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            keep_checkpoints=cfg.keep_checkpoints,
            progress=cfg.progress,
            **options,
        )

    # ----- the folder -------------------------------------------------------------------------------------
    def claim(self) -> None:
        """Lock the output folder (refusing another run's), then tidy what an interrupted run left there.
        Every process calls it (rank 0's error is raised on all of them); :meth:`run` does if nobody did."""
        self.world.on_main(self._claim)
        self.claimed = True

    def _claim(self) -> None:
        self.lock = claim(self.output, self.resume, self.overwrite, log=self.log)
        try:
            removed = remove_stale_temporaries(self.output)
            if removed:
                self.log(f"removed {len(removed)} temporary file(s) left by an interrupted run in {self.output}")
            resumed = self.task.resumed()
            if resumed is not None:
                reconcile_log(self.output / LOG_NAME, resumed.position, resumed.last, key=self.task.log_key)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output folder (the OS releases it too if the process dies)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ----- the run ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train the task's remaining periods; returns the last period's record ({} if none)."""
        record: dict = {}
        try:
            if not self.claimed:  # (not `lock is None`: only rank 0 ever holds the lock)
                self.claim()
            with self.stop:
                first = self.task.start()
                if first is not None:
                    self.append(first)
                periods = list(self.task.periods())
                for number, index in enumerate(periods, 1):
                    self._period(index)
                    self.check_weights()  # before evaluating weights that could not be saved
                    record = self.task.end_period(index) or {}
                    self.save(record or None)
                    if record:
                        self.append(record)
                    # A signal during evaluation: the period's checkpoint is written; stop before the next one.
                    if number < len(periods) and self.stop_agreed():
                        raise self.interrupted(f"after {self.task.where(False).removeprefix('at ')}")
        finally:
            self.close()
        return record

    def _period(self, index: int) -> None:
        period = self.task.period(index)
        bar = tqdm(
            period.batches,
            total=period.total,
            initial=period.done,
            desc=period.label,
            file=sys.stderr,
            leave=False,
            disable=not (self.progress and self.world.is_main),
        )
        try:
            for batch in bar:
                terms = self.task.step(batch)
                if terms is not None:
                    self.check_loss(terms)
                    record = self.task.update(terms)
                    if record is not None:
                        self.append(record)
                    if "loss" in terms:
                        bar.set_postfix(loss=f"{terms['loss']:.3f}", refresh=False)
                # SIGINT/SIGTERM: keep the steps done (every process agrees, so all stop after the same step)
                if self.stop_agreed():
                    bar.close()
                    self.save(None)
                    raise self.interrupted(self.task.where(False))
                if terms is not None and self.task.save_due():
                    self.save(None)
        finally:
            bar.close()

    def append(self, record: dict) -> None:
        if self.world.is_main:
            append_log(self.output / LOG_NAME, record)

    # ----- stopping -----------------------------------------------------------------------------------------
    def asked(self) -> float:
        """1.0 if this process got SIGINT/SIGTERM, else 0.0: a number for a task's own per-step all-reduce."""
        return float(self.stop.signum is not None)

    def agree(self, total: float) -> None:
        """The sum of :meth:`asked` over the processes, as the task's step reduced it: this step's stop
        decision then costs no all-reduce of its own. Every process must call it in the same steps."""
        self.agreed = total

    def stop_agreed(self) -> bool:
        """Whether any process got SIGINT/SIGTERM. Alone, as soon as the signal came; with several
        processes, the sum the task agreed on this step, else one small all-reduce, so that all of them
        see the same answer and stop after the same step."""
        agreed, self.agreed = self.agreed, None  # (good for one step only)
        if not self.world.enabled:
            return self.asked() > 0
        return (agreed if agreed is not None else self.world.sum([self.asked()])[0]) > 0

    def interrupted(self, where: str) -> TrainingInterrupted:
        return interrupted(self.stop.signum, self.output, where)

    # ----- finite checks and checkpoints ------------------------------------------------------------------
    def kept(self) -> str:
        return kept_message(self.output)

    def check_loss(self, terms: dict[str, float]) -> None:
        if not all(math.isfinite(v) for v in terms.values()):
            raise TrainingDiverged(
                f"loss is not finite {self.task.where(True)}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                + f". {self.kept()}; {self.task.advice}"
            )

    def check_weights(self) -> None:
        check_finite_weights(self.task.module, self.task.where(False), f"{self.kept()}; {self.task.advice}")

    def save(self, record: dict | None) -> Path | None:
        """Check the weights, then write the task's checkpoint (rank 0) as ``checkpoint.pt`` and rotate
        the numbered ones."""
        self.check_weights()
        saved = self.task.checkpoint(record)
        if saved is None or not self.world.is_main:
            return None
        return save_rotating(self.output, saved.payload, saved.epoch, saved.step, self.keep_checkpoints)


def check_output_dir(path: str | os.PathLike) -> None:
    """Fail before the (slow) set-up if the folder cannot be made or written; creates nothing."""
    check_writable(path)


def interrupted(signum: int | None, output: Path, where: str) -> TrainingInterrupted:
    """The error that stops a run after SIGINT/SIGTERM, once the steps done are saved in ``output``."""
    signum = signum or signal.SIGINT  # (another process of the run may have got it)
    checkpoint = output / LATEST
    return TrainingInterrupted(
        f"{signal.Signals(signum).name} {where}: the steps done are saved in {checkpoint}", signum, checkpoint
    )


def kept_message(output: Path) -> str:
    """What a run that stops on an error leaves: its last checkpoint, if it wrote one."""
    latest = output / LATEST
    if latest.is_file():
        return f"The last good checkpoint ({latest}) is kept"
    return "No checkpoint was written yet"


def check_finite_weights(module: nn.Module, where: str, then: str) -> None:
    """Never save non-finite weights: one step with a huge learning rate can leave the loss of that step
    finite and the weights NaN, and they would evaluate to plausible-looking results later."""
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    if tensors and not bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
        bad = sum(not bool(t.isfinite().all()) for t in tensors)
        raise TrainingDiverged(
            f"{bad} of {len(tensors)} weight tensors became NaN or infinite {where}; they were not saved. {then}"
        )

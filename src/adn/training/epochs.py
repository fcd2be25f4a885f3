"""What the epoch-based tasks of :class:`adn.training.loop.RunLoop` share: their position in the run.

Classification (:class:`adn.vision.train.Trainer`) and detection (:class:`adn.detection.train.DetectionTask`)
both train epochs of seeded batches (:class:`adn.training.sampling.EpochBatches`), checkpoint at an epoch's
end or within it, and resume from either. The position bookkeeping that makes a resumed run continue exactly
where it stopped (the periods left, the epoch's batches and progress, the checkpoint's position fields, the
same global batch on resume) is the same for both, so it is written once here; what they train on, their
step and their evaluation stay theirs. A step-based task (language models) has no use for it.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch.utils.data import DataLoader

from ..errors import CheckpointError
from ..utils.checkpoint_file import checkpoint_payload
from .loop import Checkpoint, Period, Resumed
from .loop import say as log
from .sampling import EpochBatches
from .signals import ignore_interrupts


class EpochTask:
    """The epoch-based half of the :class:`~adn.training.loop.Task` protocol, for a task to inherit.

    The task sets ``cfg`` (with ``epochs``, ``batch_size``, ``seed``, ``workers``, ``max_steps_per_epoch``),
    ``world`` (:class:`~adn.training.distributed.Distributed`), ``train_set``, ``optimizer``, ``module``
    (the trained network), ``meta``, ``global_step``, and the position: ``start_epoch``, ``resumed_at``,
    ``epoch``, ``batches`` (this epoch's :class:`EpochBatches`, None between epochs) and ``progress`` (a
    dataclass of the epoch's running figures with at least ``steps`` and ``global_batch``).
    """

    # ----- the Task protocol: the loop calls these -------------------------------------------------------------
    def resumed(self) -> Resumed | None:
        return self.resumed_at

    def start(self) -> None:
        return None

    def periods(self) -> range:
        return range(self.start_epoch, self.cfg.epochs)

    # ----- for the task's own period() and checkpoint() --------------------------------------------------------
    def begin_epoch(self, epoch: int) -> EpochBatches:
        """Start an epoch: fresh progress (unless it is the epoch a resumed run continues) and this process's
        batches of it (``self.batches``), those already trained on skipped."""
        cfg, world = self.cfg, self.world
        if epoch != self.start_epoch:
            self.progress = type(self.progress)(global_batch=self.progress.global_batch)
        self.epoch = epoch
        self.batches = EpochBatches(
            len(self.train_set),
            cfg.batch_size,
            cfg.seed,
            epoch,
            world.rank,
            world.world_size,
            start=self.progress.steps,
            steps=cfg.max_steps_per_epoch,
        )
        return self.batches

    def epoch_loader(self, collate_fn) -> DataLoader:
        """A loader of this epoch's batches of ``train_set`` (a :class:`~adn.training.sampling.SeededSamples`)."""
        cfg, epoch = self.cfg, self.epoch
        self.train_set.epoch = epoch
        # The loader's own generator (seeded per epoch) seeds its workers, so creating it mid-epoch on
        # resume does not draw from the global RNG stream that dropout and MixUp use.
        return DataLoader(
            self.train_set,
            batch_sampler=self.batches,
            num_workers=cfg.workers,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(cfg.seed + epoch),
            worker_init_fn=ignore_interrupts,
        )

    def epoch_period(self, batches) -> Period:
        """The loop's view of this epoch: ``batches`` (the rest of it, when resumed in its middle)."""
        return Period(
            batches,
            total=self.batches.steps,
            done=self.progress.steps,
            label=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
        )

    def epoch_checkpoint(self, record: dict | None, rng_states: list, **state) -> Checkpoint:
        """The checkpoint of an epoch's end (``record``: its metrics) or of a step within the epoch (``record``
        None: the epoch's progress is saved), with the processes' RNG states and the task's own ``state``."""
        mid_epoch = record is None
        payload = {
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "step_in_epoch": self.progress.steps if mid_epoch else None,
            "rng": rng_states,
        }
        if mid_epoch:
            payload["progress"] = asdict(self.progress)
        else:
            payload["metrics"] = record
        payload.update(state)
        return Checkpoint(checkpoint_payload(self.module, self.meta, **payload), self.epoch + 1, self.progress.steps)

    # ----- resuming -------------------------------------------------------------------------------------------
    def resume_at(self, epoch: int, metrics: dict | None = None, progress=None) -> str:
        """Set where a resumed run starts: after ``epoch`` (an epoch-end checkpoint, ``progress`` None), or
        within it with its saved ``progress``. Returns the position for the "resumed from" message."""
        if progress is None:
            self.start_epoch = epoch + 1
            self.resumed_at = Resumed(self.start_epoch, metrics)
            return f"epoch {self.start_epoch + 1}"
        self.start_epoch = epoch
        self.resumed_at = Resumed(self.start_epoch)
        self.progress = progress
        return f"epoch {self.start_epoch + 1}, step {self.progress.steps + 1}"

    def check_global_batch(self, source) -> None:
        """A run resumed within an epoch must train the same global batches as the one that saved it."""
        cfg, world = self.cfg, self.world
        if self.progress.global_batch != cfg.batch_size * world.world_size:
            raise CheckpointError(
                f"cannot resume mid-epoch from {source}: it was saved with {self.progress.global_batch} "
                f"images per step (batch size x processes), this run has {cfg.batch_size} x "
                f"{world.world_size}; use the same -b and number of processes, or resume from an "
                f"epoch-end checkpoint"
            )

    def say(self, message: str) -> None:
        """A message on rank 0 only."""
        if self.world.is_main:
            log(message)

"""``adn train``: Algorithm 1 (sub-path specialization) and the paper's baselines and ablations.

The steps of the three methods (:mod:`adn.training.methods`):
- ``adn``: super-net forward + backward (alpha * CE), then base-net forward + backward
  ((1 - alpha) * KL terms against the detached super-net). Two backward passes, so the peak memory
  is that of one sub-network; the gradients equal those of the paper's single loss.
- ``joint`` (ablation without specialization): (CE(super) + CE(base)) / 2, also in two passes.
- ``individual`` (baseline): plain training of one fixed sub-network.
Skip-aware norms off (``skip_aware_norm=False``) is the other ablation.

The run (:func:`train`) is a task of :class:`adn.training.loop.RunLoop`, the loop detection and language
models share: it owns the output folder, Ctrl-C/SIGTERM, the finite checks, ``log.jsonl`` and checkpoint
rotation. :class:`Trainer` adds what is classification's own: data parallelism over torchrun's processes
(:mod:`adn.training.distributed`), mixed precision (:mod:`adn.training.precision`), and checkpoints every
epoch and every ``save_every_steps`` steps from which ``resume`` continues exactly where the run stopped
(model, EMA, optimizer, scaler, schedule, position in the epoch, RNG states, and the epoch's partial metrics).
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

from ..core.distill import SubPathDistillationLoss
from ..core.recalibrate import batch_norms
from ..core.skip import SkipConfig
from ..core.sync_bn import convert_sync_batchnorm
from ..errors import CheckpointError, DataError
from ..models import build_model
from ..training import rng
from ..training.distributed import Distributed
from ..training.distributed import setup as setup_distributed
from ..training.epochs import EpochTask
from ..training.loop import Checkpoint, Period, RunLoop, check_output_dir
from ..training.methods import METHODS, adn_step, individual_step, joint_step
from ..training.optim import build_ema, build_scheduler
from ..training.precision import Precision
from ..training.sampling import SeededSamples
from ..utils.checkpoint_file import load_checkpoint
from .checkpoint import load_weights, validate_meta
from .data import Augmentation, calibration_loader, collate_readable, collate_readable_pairs, eval_loader, load_dataset
from .evaluate import evaluate_accuracy
from .init_from import init_from
from .memory_data import TensorImages, training_batches
from .stored_statistics import after_training
from .train_config import TrainConfig
from .train_setup import (
    build_batch_mixer,
    build_optimizer,
    check_input_fits,
    convert_for_training,
    run_meta,
    speed_settings,
)
from .train_state import MAX_EPOCHS, EpochProgress, check_position, restore_rng  # noqa: F401  (MAX_EPOCHS: adn.train's API)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(cfg: TrainConfig) -> dict:
    """Run a training; returns the last epoch's metrics. Writes ``checkpoint.pt`` (every epoch and every
    ``save_every_steps`` steps) and ``log.jsonl`` (one line per epoch) in ``cfg.output_dir``, and at the end
    each depth's batch-norm statistics into ``checkpoint.pt`` when the run wants them
    (:func:`adn.vision.stored_statistics.after_training`). Under torchrun, every process calls this; rank 0
    alone writes files and logs."""
    cfg.validate()
    world, device = setup_distributed(cfg.device)
    trainer = None
    try:
        trainer = Trainer(cfg, world, device)
        record = trainer.run()
        if world.is_main:  # (the folder is still this run's: the lock is released in close())
            after_training(cfg, device, log=_log)
        return record
    finally:
        if trainer is not None:
            trainer.close()
        world.close()


class Trainer(EpochTask):
    """One training run, as a :class:`~adn.training.loop.Task` of its :class:`RunLoop` (``self.loop``):
    :meth:`__init__` sets everything up (restoring a checkpoint when resuming) and claims the output
    folder, :meth:`run` trains the remaining epochs, :meth:`close` releases the folder."""

    log_key = "epoch"
    advice = "try a lower --lr"

    def __init__(self, cfg: TrainConfig, world: Distributed, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.output = Path(cfg.output_dir)
        resume = load_checkpoint(cfg.resume) if cfg.resume else None  # fail early on a bad checkpoint
        world.on_main(lambda: check_output_dir(self.output))
        rng.seed_all(cfg.seed)  # the same on every process: the same initial weights

        augmentation = Augmentation(cfg.auto_augment, cfg.random_erase, cfg.interpolation)
        data = load_dataset(
            cfg.data,
            cfg.data_path,
            train_subset=cfg.train_subset,
            val_subset=cfg.val_subset,
            seed=cfg.seed,
            image_size=cfg.train_crop_size,
            val_resize_size=cfg.val_resize_size,
            augment=augmentation,
            skip_bad_images=cfg.skip_bad_images,
            val_from_train=cfg.val_from_train,
        )
        self.meta = run_meta(cfg, data)
        model = build_model(
            cfg.model,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            weights=cfg.weights,
            **self.meta["model_kwargs"],
        )
        net = self.net = convert_for_training(model, cfg).to(device)
        if cfg.init_from and resume is None:  # (on resume, the checkpoint's weights are the starting point)
            init_from(net, cfg.init_from, cfg.model, log=self.say)
        if cfg.method == "individual":
            net.skip = SkipConfig(cfg.skip, net.num_stages)
        check_input_fits(net, data, cfg, device)
        self.amp, self.channels_last, speed_note = speed_settings(cfg, net, device)
        self.meta["speed"] = {"amp": self.amp, "channels_last": self.channels_last}
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        if cfg.sync_bn and world.enabled:
            convert_sync_batchnorm(net, device)

        self.optimizer = build_optimizer(net, cfg)
        self.ema = build_ema(net, cfg, world.world_size) if cfg.model_ema else None
        # Automatic mixed precision means bfloat16 (chosen because it is native); --amp keeps CUDA's float16.
        amp_dtype = "bfloat16" if cfg.amp is None and cfg.amp_dtype == "auto" else cfg.amp_dtype
        self.precision = Precision(device, self.amp, amp_dtype)
        self.mixer = build_batch_mixer(cfg, data.num_classes)
        self.start_epoch, self.global_step, self.resumed_at = 0, 0, None
        self.progress = EpochProgress(global_batch=cfg.batch_size * world.world_size)
        rng_state = self._load_state(resume) if resume is not None else None
        # The epoch being trained: its batches, and when its clocks started (less the time a resumed
        # epoch had already taken).
        self.epoch, self.batches, self.started, self.cpu_started = self.start_epoch, None, 0.0, 0.0
        self.counts: dict = {}  # the step's images and correct answers, counted once its loss proves finite
        world.broadcast_module(net)  # identical weights everywhere, whatever happened before
        if self.ema is not None:
            world.broadcast_module(self.ema)

        # The learning rate is a function of (settings, epoch): on resume, replay the schedule up to the
        # saved epoch, so a run resumed with a larger --epochs follows the longer schedule.
        self.scheduler = build_scheduler(self.optimizer, cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "step() before optimizer.step()"
            for _ in range(min(self.start_epoch, cfg.epochs)):  # (nothing is trained beyond cfg.epochs)
                self.scheduler.step()

        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        if cfg.method == "adn":
            self.step_fn = functools.partial(adn_step, bn_stats_from=cfg.bn_stats_from, precision=self.precision)
            self.loss_fn = SubPathDistillationLoss(
                cfg.alpha,
                cfg.temperature,
                cfg.feature_kd,
                cfg.label_smoothing,
                channel_dim=net.adn_info["channel_dim"],
                base_ce=cfg.base_ce,
            )
        else:
            step = joint_step if cfg.method == "joint" else individual_step
            self.step_fn, self.loss_fn = functools.partial(step, precision=self.precision), criterion
        self.eval_configs = (
            [net.skip]
            if cfg.method == "individual"
            else [SkipConfig.super_net(net.num_stages), SkipConfig.base_net(net.num_stages)]
        )
        # In-memory data sets (Fashion-MNIST, CIFAR) train from whole-tensor batches kept on the device;
        # others (and PIL-only augmentations) go through a DataLoader, one image at a time.
        self.in_memory = isinstance(data.train, TensorImages) and data.train.batched
        self.train_set = data.train.to(device) if self.in_memory else SeededSamples(data.train, cfg.seed)
        # Each process evaluates every world_size-th image: no image twice, none left out.
        val = data.val
        if world.enabled:
            shard = range(world.rank, len(val), world.world_size)
            val = val.subset(list(shard)) if isinstance(val, TensorImages) else Subset(val, shard)
        if isinstance(val, TensorImages):
            val = val.to(device)
        self.val_loader = eval_loader(
            val, cfg.batch_size, cfg.workers, collate_readable_pairs if cfg.skip_bad_images else None
        )
        # Validation with recalibrated batch-norm statistics next to the running ones: early in training at a
        # high learning rate the running averages lag the weights and the accuracy they give can collapse
        # (docs/evaluation.md); the recalibrated figure shows what the weights themselves do.
        self.calibration = None
        # Not with --compile: recalibration flips the norms' modes and momenta, and each flip would be traced
        # into new graphs. Evaluate a compiled run's checkpoint with `adn eval --recalibrate-bn` instead.
        if cfg.recalibrate_bn and batch_norms(net) and not cfg.skip_bad_images and not cfg.compile:
            source = self.train_set if self.in_memory else data.train  # image folders: augmented images
            self.calibration = calibration_loader(source, cfg.batch_size, cfg.recalibrate_bn, cfg.workers)
        if cfg.compile:  # in place: net.skip and the stage hooks keep working; one graph per depth
            net.compile(backend=cfg.compile_backend)
        self.module = net  # (the weights the loop checks before every save)

        # Only now, with every setting, the data and the model checked, is the folder made and claimed, so
        # that a failed start leaves nothing behind; the lock is held until the run ends or close().
        if rng_state is not None:
            restore_rng(rng_state, cfg.resume)
        elif world.rank > 0:  # dropout, MixUp, ... differ between processes (augmentation is per image)
            rng.seed_all(cfg.seed + 100_003 * world.rank)
        self.loop = RunLoop.of(self, cfg, world=world, log=_log)
        self.loop.claim()
        self.say(
            f"training {cfg.model} ({net.num_stages} stages, {2**net.num_stages} sub-networks) with "
            f"method={cfg.method} on {data.description}: {len(data.train)} train / {len(data.val)} val images, "
            f"device={device}, threads={torch.get_num_threads()}"
            + (
                f", {world.world_size} processes x batch {cfg.batch_size}" + (" (sync-bn)" if cfg.sync_bn else "")
                if world.enabled
                else ""
            )
            + (f", {self.precision}" if self.amp else ", float32")
            + (", channels-last" if self.channels_last else "")
            + (f", compiled ({cfg.compile_backend})" if cfg.compile else "")
        )
        if speed_note:
            self.say(speed_note)

    def _load_state(self, resume: dict):
        """:meth:`_restore`, with a checkpoint whose training state is malformed (wrong types, missing
        entries) reported as such instead of a KeyError or TypeError from deep inside."""
        source = self.cfg.resume
        validate_meta(resume["meta"], source=str(source))
        check_position(resume, source)
        try:
            return self._restore(resume)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
            raise CheckpointError(
                f"cannot resume from {source}: its training state is malformed ({type(error).__name__}: "
                f"{str(error).strip()[:200]}); it was not written by adn train or was altered. "
                f"Resume from another checkpoint"
            ) from error

    def run(self) -> dict:
        """Train the remaining epochs; returns the last epoch's record. Releases the folder when done."""
        return self.loop.run()

    def close(self) -> None:
        """Release the output folder (the OS releases it too if the process dies)."""
        self.loop.close()

    # ----- resuming ---------------------------------------------------------------------------------------
    def _restore(self, resume: dict):
        """Load a checkpoint's state into this run; returns this process's saved RNG state (or None)."""
        cfg, source = self.cfg, self.cfg.resume
        for key in ("model", "num_classes", "in_channels", "skip_aware_norm", "method", "model_kwargs"):
            if resume["meta"].get(key) != self.meta.get(key):
                hint = (
                    f"; add --method {resume['meta'][key]}"
                    if key == "method" and resume["meta"][key] in METHODS
                    else ""
                )
                raise CheckpointError(
                    f"cannot resume from {source}: it was trained with {key}="
                    f"{resume['meta'].get(key)!r}, this run has {key}={self.meta.get(key)!r}{hint}"
                )
        load_weights(self.net, resume["model"], source=source)
        self.optimizer.load_state_dict(resume["optimizer"])
        if self.ema is not None:
            if "model_ema" not in resume:
                raise CheckpointError(f"cannot resume with --model-ema from {source}: it holds no EMA weights")
            self.ema.load_state_dict(resume["model_ema"])
        self.precision.load_state_dict(resume.get("scaler"))
        for group in self.optimizer.param_groups:  # the schedule is recomputed from this run's settings
            group["lr"] = group["initial_lr"] = cfg.lr * group.get("lr_scale", 1.0)
        self.global_step = resume.get("global_step", 0)
        if resume.get("step_in_epoch") is None:  # an epoch-end checkpoint
            where = self.resume_at(resume["epoch"], resume.get("metrics"))
        else:
            where = self.resume_at(resume["epoch"], progress=EpochProgress(**resume["progress"]))
            self.check_global_batch(source)
        self.say(f"resumed from {source} at {where}")
        if self.start_epoch >= cfg.epochs:
            self.say(f"nothing to do: the checkpoint already finished {self.start_epoch} of {cfg.epochs} epochs")
        states = resume.get("rng") or ([resume["rng_state"]] if "rng_state" in resume else [])
        if self.world.rank < len(states):
            return states[self.world.rank]
        if states:
            self.say(
                f"the checkpoint holds RNG states of {len(states)} processes, this run has "
                f"{self.world.world_size}: the others start from fresh seeds"
            )
        return None

    # ----- the Task protocol: the loop calls these (resumed, start, periods: EpochTask's) ----------------------
    def period(self, epoch: int) -> Period:
        """The batches of an epoch still to train (all of them, unless resumed in its middle)."""
        batches = self.begin_epoch(epoch)
        loader = training_batches(self.train_set, batches) if self.in_memory else self.epoch_loader(collate_readable)
        self.net.train()
        self.started = time.perf_counter() - self.progress.seconds
        self.cpu_started = time.process_time() - self.progress.cpu_seconds
        return self.epoch_period(loader)

    def step(self, batch) -> dict[str, float] | None:
        images, targets, skipped = batch
        return self.train_step(images, targets, skipped)

    def train_step(self, images, targets, skipped: int) -> dict[str, float] | None:
        """Forward and backward on this process's share of a global batch; the loss terms averaged over
        the processes, or None if there was nothing to train on (all images of the batch unreadable and
        skipped). :meth:`update` then applies the step."""
        world = self.world
        if images is None:  # every image of this batch was unreadable (--skip-bad-images)
            if world.enabled:
                raise DataError(
                    f"every image of a batch on process {world.rank} was unreadable; the processes "
                    f"cannot stay in step. Remove the unreadable files (named above)"
                )
            self.progress.skipped_images += skipped
            return None
        images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = targets
        if self.mixer is not None:  # soft targets; accuracy is measured against the dominant label
            images, targets = self.mixer(images, targets)
            labels = targets.argmax(1)
        self.optimizer.zero_grad(set_to_none=True)
        result = self.step_fn(self.net, images, targets, self.loss_fn)
        # One small all-reduce for the metrics: loss terms averaged, counts summed over processes; its last
        # number is the loop's stop request, so that all processes stop after the same step at no extra cost.
        names, correct = (
            list(result["terms"]),
            {k: int((v.argmax(1) == labels).sum()) for k, v in result["logits"].items()},
        )
        totals = world.sum([*result["terms"].values(), *correct.values(), labels.numel(), skipped, self.loop.asked()])
        self.loop.agree(totals.pop())
        self.counts = {
            "skipped": int(totals.pop()),
            "seen": int(totals.pop()),
            "correct": dict(zip(correct, map(int, totals[len(names) :]))),
        }
        return {k: v / world.world_size for k, v in zip(names, totals)}

    def update(self, terms: dict[str, float]) -> None:
        """The optimizer step after a finite loss, and the epoch's running metrics."""
        cfg, progress = self.cfg, self.progress
        self.world.average_gradients(self.net.parameters())
        if cfg.clip_grad_norm is not None:
            self.precision.unscale(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), cfg.clip_grad_norm)
        self.precision.step(self.optimizer)
        self.global_step += 1
        progress.steps += 1
        progress.seen += self.counts["seen"]
        progress.skipped_images += self.counts["skipped"]
        for key, value in terms.items():
            progress.sums[key] = progress.sums.get(key, 0.0) + value
        for key, value in self.counts["correct"].items():
            progress.correct[key] = progress.correct.get(key, 0) + value
        if self.ema is not None and progress.steps % cfg.model_ema_steps == 0:
            self.ema.update_parameters(self.net)

    def save_due(self) -> bool:
        """A checkpoint every ``save_every_steps`` steps, but none on an epoch's last step (its own follows)."""
        every = self.cfg.save_every_steps
        return bool(every) and self.global_step % every == 0 and self.progress.steps < self.batches.steps

    def end_period(self, epoch: int) -> dict:
        """The epoch's record: the learning rate it trained with, its mean training metrics, validation."""
        progress = self.progress
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "steps": progress.steps,
            **{f"train_{k}": v / max(progress.steps, 1) for k, v in progress.sums.items()},
            **{
                f"train_acc1_{_label(k, self.net)}": 100.0 * v / max(progress.seen, 1)
                for k, v in progress.correct.items()
            },
        }
        if self.cfg.skip_bad_images:
            record["train_skipped_images"] = progress.skipped_images
        for skip, accs in self.evaluate(self.net).items():
            record[f"val_acc1_{_label(skip, self.net)}"] = accs["acc1"]
            record[f"val_acc5_{_label(skip, self.net)}"] = accs["acc5"]
        if self.calibration is not None:
            for skip, accs in self.evaluate(self.net, recalibrate=True).items():
                record[f"val_acc1_{_label(skip, self.net)}_recal"] = accs["acc1"]
        if self.ema is not None:
            for skip, accs in self.evaluate(self.ema.module).items():
                record[f"val_acc1_{_label(skip, self.net)}_ema"] = accs["acc1"]
        record["epoch_time_s"] = time.perf_counter() - self.started
        record["epoch_cpu_s"] = time.process_time() - self.cpu_started
        self.batches = None  # the epoch is over: where() names it whole ("after epoch 2")
        self.say(_summary(record))
        return record

    def where(self, pending: bool) -> str:
        if self.batches is None:
            return f"at epoch {self.epoch + 1}"
        return f"at epoch {self.epoch + 1}, step {self.progress.steps + int(pending)} of {self.batches.steps}"

    def checkpoint(self, record: dict | None) -> Checkpoint | None:
        """The checkpoint of an epoch's end (``record``: its metrics) or of a step within the epoch.
        Every process takes part (their RNG states are gathered); rank 0 gets it."""
        progress, mid_epoch = self.progress, record is None
        if mid_epoch:
            # A resumed epoch's times stay whole ...
            progress.seconds = time.perf_counter() - self.started
            progress.cpu_seconds = time.process_time() - self.cpu_started
            # ... and its batch-norm statistics are what every process will load on resume, and what an
            # uninterrupted run goes on with.
            self.world.average_buffers(self.net)
            if self.ema is not None:
                self.world.average_buffers(self.ema)
        rng_states = self.world.gather(rng.capture())
        if not self.world.is_main:
            return None
        state = {}
        if self.ema is not None:
            state["model_ema"] = self.ema.state_dict()
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.state_dict()
        return self.epoch_checkpoint(record, rng_states, **state)

    # ----- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, recalibrate: bool = False) -> dict:
        self.world.average_buffers(model)
        return evaluate_accuracy(
            model,
            self.val_loader,
            self.eval_configs,
            device=self.device,
            sum_over_processes=self.world.sum_tensor if self.world.enabled else None,
            recalibrate=(self.calibration, self.cfg.recalibrate_bn) if recalibrate else None,
        )


def _label(skip: str, net) -> str:
    """'super' / 'base' for the two trained extremes, else the skip string."""
    config = SkipConfig(skip, net.num_stages)
    return "super" if config.is_super else "base" if config.is_base else str(config)


def _summary(record: dict) -> str:
    def accs(suffix: str) -> str:
        return " ".join(
            f"{k[len('val_acc1_') : len(k) - len(suffix)]}={v:.2f}%"
            for k, v in record.items()
            if k.startswith("val_acc1_") and k.endswith(suffix) and (suffix or not k.endswith(("_recal", "_ema")))
        )

    recal, ema = accs("_recal"), accs("_ema")
    return (
        f"epoch {record['epoch']}: loss {record.get('train_loss', float('nan')):.4f}, val acc@1 {accs('')}"
        + (f" (recalibrated BN: {recal})" if recal else "")
        + (f" (EMA: {ema})" if ema else "")
        + f", {record['epoch_time_s']:.1f}s"
    )

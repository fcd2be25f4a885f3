"""``adn train``: Algorithm 1 (sub-path specialization) and the paper's baselines and ablations.

One epoch loop, three step functions:
- ``adn``: super-net forward + backward (alpha * CE), then base-net forward + backward
  ((1 - alpha) * KL terms against the detached super-net). Two backward passes, so the peak memory
  is that of one sub-network; the gradients equal those of the paper's single loss.
- ``joint`` (ablation without specialization): (CE(super) + CE(base)) / 2, also in two passes.
- ``individual`` (baseline): plain training of one fixed sub-network.
Skip-aware norms off (``skip_aware_norm=False``) is the other ablation.

The run (:func:`train`) adds what long jobs need: data parallelism over torchrun's processes
(:mod:`adn.distributed`), mixed precision (:mod:`adn.precision`), and checkpoints every epoch and every
``save_every_steps`` steps from which ``resume`` continues exactly where the run stopped (model, EMA,
optimizer, scaler, schedule, position in the epoch, RNG states, and the epoch's partial metrics).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import jsonout
from . import rng
from .atomic import atomic_write
from .checkpoint import (CheckpointError, checkpoint_payload, load_checkpoint, load_weights, remove_stale_temporaries,
                         save_rotating, validate_meta)
from .convert import convert
from .data import (DATASETS, Augmentation, DataError, calibration_loader, collate_readable, collate_readable_pairs,
                   eval_loader, ignore_interrupts, load_dataset)
from .distill import FEATURE_KD_MODES, SubPathDistillationLoss
from .distributed import Distributed, setup as setup_distributed
from .evaluate import evaluate_accuracy
from .init_from import init_from, scale_body_lr
from .labels import dataset_class_names
from .layers import SkipAwareNorm
from .memory_data import TensorImages, training_batches
from .recalibrate import batch_norms
from .rundir import check_writable, claim as claim_output_dir
from .models import NEEDS_IMAGE_SIZE, build_model
from .preprocess import Preprocessing
from .precision import AMP_DTYPES, FLOAT32, Precision, native_bfloat16
from .sampling import EpochBatches, SeededSamples
from .skip import SkipConfig
from .sync_bn import convert_sync_batchnorm

METHODS = ("adn", "joint", "individual")
SCHEDULERS = ("cosineannealinglr", "steplr", "multisteplr", "exponentiallr", "constant")
OPTIMIZERS = ("sgd", "adamw", "rmsprop")
# Parameters that --transformer-embedding-decay applies to (torchvision ViT and Swin names).
EMBEDDING_PARAMETERS = ("class_token", "pos_embedding", "relative_position_bias_table", "absolute_pos_embed")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after it saved the steps done (``checkpoint``, or None if nothing
    needed saving); ``adn train`` turns it into a message saying how to resume."""

    def __init__(self, message: str, signum: int, checkpoint: Path | None):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM only ask the run to stop: the loop notices
    at the next step, saves a mid-epoch checkpoint and raises :class:`TrainingInterrupted`. Ctrl-C used to
    lose the whole epoch. A second signal interrupts at once (KeyboardInterrupt; the last checkpoint is
    whole either way, since checkpoints are replaced atomically)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._saved: dict = {}

    def __enter__(self) -> StopSignals:
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


@dataclass
class TrainConfig:
    """Every setting of a training run; ``adn train`` flags map one to one (``--lr`` -> ``lr``)."""
    model: str = "resnet20"
    data: str = "fashion-mnist"
    data_path: str | None = None
    output_dir: str = "runs/adn"
    method: str = "adn"
    skip: str = "super"                 # the sub-network trained by method=individual
    skip_aware_norm: bool = True
    weights: str | None = None          # torchvision weights name, e.g. DEFAULT
    init_from: str | None = None        # weights file of a plain or adn network to start from (adn.init_from)
    width: int | None = None            # base width of the small ResNets
    epochs: int = 10
    batch_size: int = 128
    workers: int = 0
    opt: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    lr_scheduler: str = "cosineannealinglr"
    lr_step_size: int = 30
    lr_steps: tuple[int, ...] = ()          # multisteplr: epochs at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    lr_warmup_epochs: int = 0
    lr_warmup_method: str = "linear"
    lr_warmup_decay: float = 0.01
    body_lr_scale: float = 1.0          # learning rate of all but the classification head, as a factor of lr
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None
    norm_weight_decay: float | None = None
    bias_weight_decay: float | None = None
    transformer_embedding_decay: float | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    auto_augment: str | None = None
    random_erase: float = 0.0
    interpolation: str = "bilinear"
    model_ema: bool = False
    model_ema_steps: int = 32
    model_ema_decay: float = 0.99998
    alpha: float = 0.5
    temperature: float = 1.0
    feature_kd: str = "spatial"
    base_ce: float = 0.0                # deviation from the paper: label loss for the base-net too
    bn_stats_from: str = "super"       # which pass updates the running stats of norms without a twin
    train_subset: int | None = None
    val_subset: int | None = None
    val_from_train: int | None = None   # validate on N held-out training images, not the test split
    train_crop_size: int | None = None
    val_resize_size: int | None = None
    max_steps_per_epoch: int | None = None
    recalibrate_bn: int = 10            # per-epoch validation also with batch-norm statistics recomputed on N batches
    seed: int = 0
    device: str = "auto"
    resume: str | None = None
    progress: bool = True
    # scale and speed
    sync_bn: bool = False               # batch statistics over all processes (torchrun)
    amp: bool | None = None             # None: bfloat16 autocast where the hardware has native bfloat16
    amp_dtype: str = "auto"             # float16 on CUDA (with a GradScaler), bfloat16 on CPU
    channels_last: bool | None = None   # None: on where mixed precision is (and the layout is safe)
    compile: bool = False
    compile_backend: str = "inductor"
    # checkpoints
    save_every_steps: int | None = None
    keep_last: int = 0                  # numbered checkpoints kept beside checkpoint.pt
    skip_bad_images: bool = False
    overwrite: bool = False             # a fresh run may delete another run's files in output_dir

    def __post_init__(self):
        self.lr_steps = tuple(self.lr_steps)  # from the command line or a checkpoint's JSON: a list

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)
        self._check_finite()
        need(not (self.init_from and self.weights), "--init-from and --weights exclude each other: both give the "
                                                    "starting weights")
        need(bool(self.resume) or not self.init_from or os.path.isfile(self.init_from),
             f"--init-from {self.init_from}: no such file")
        need(not (self.overwrite and self.resume), "--overwrite and --resume exclude each other: --resume continues "
                                                   "the run in --output-dir, --overwrite replaces it")
        need(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.data in DATASETS, f"--data must be one of {', '.join(DATASETS)}, got {self.data!r}")
        need(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        need(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.weight_decay >= 0, f"--wd must be >= 0, got {self.weight_decay}")
        need(0 <= self.alpha <= 1, f"--alpha must be in [0, 1], got {self.alpha}")
        need(self.temperature > 0, f"--temperature must be positive, got {self.temperature}")
        need(0 <= self.base_ce <= 10, f"--base-ce must be in [0, 10], got {self.base_ce}")
        need(self.feature_kd in FEATURE_KD_MODES, f"--feature-kd must be one of {', '.join(FEATURE_KD_MODES)}")
        need(self.bn_stats_from in ("super", "both"), f"--bn-stats-from must be super or both, got {self.bn_stats_from!r}")
        need(self.lr_scheduler in SCHEDULERS, f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}")
        need(self.lr_scheduler != "multisteplr" or bool(self.lr_steps),
             "--lr-scheduler multisteplr needs its milestones: add --lr-steps, e.g. --lr-steps 15 23 for 30 epochs")
        # Milestones at or past --epochs are allowed (they never fire): a run trained in parts with a growing
        # --epochs (--resume) follows one schedule.
        need(all(step > 0 for step in self.lr_steps) and list(self.lr_steps) == sorted(set(self.lr_steps)),
             f"--lr-steps must be increasing positive epochs, got {' '.join(map(str, self.lr_steps))}")
        need(self.opt in OPTIMIZERS, f"--opt must be one of {', '.join(OPTIMIZERS)}, got {self.opt!r}")
        need(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "--mixup-alpha and --cutmix-alpha must be >= 0")
        need(self.clip_grad_norm is None or self.clip_grad_norm > 0, "--clip-grad-norm must be positive")
        need(self.model_ema_steps >= 1 and 0 < self.model_ema_decay < 1,
             "--model-ema-steps must be >= 1 and --model-ema-decay in (0, 1)")
        need(0 <= self.lr_warmup_epochs < self.epochs or self.lr_warmup_epochs == 0,
             f"--lr-warmup-epochs ({self.lr_warmup_epochs}) must be smaller than --epochs ({self.epochs})")
        need(self.recalibrate_bn >= 0, f"--recalibrate-bn must be >= 0 (0: off), got {self.recalibrate_bn}")
        need(self.val_from_train is None or self.val_from_train >= 1, "--val-from-train must be a positive number of images")
        need(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "--max-steps-per-epoch must be >= 1")
        need(self.amp_dtype in AMP_DTYPES, f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {self.amp_dtype!r}")
        need(self.save_every_steps is None or self.save_every_steps >= 1,
             f"--save-every-steps must be at least 1, got {self.save_every_steps}")
        need(self.keep_last >= 0, f"--keep-last must be >= 0 (0: only checkpoint.pt), got {self.keep_last}")
        self._check_ranges()

    def _check_finite(self) -> None:
        """An infinite --lr used to train to NaN weights without a word (and NaN passes no comparison)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{_flag(f.name)} must be a finite number, got {value}")

    def _check_ranges(self) -> None:
        """The numeric settings the checks above leave out: a negative --lr-gamma used to give a negative
        learning rate and a negative --label-smoothing none at all, silently."""
        for name, low, high in NUMBER_RANGES:
            value = getattr(self, name)
            if value is not None and not _within(value, low, high):
                raise ValueError(f"{_flag(name)} must be in {_interval(low, high)}, got {value}")
        if self.lr_min > self.lr:
            raise ValueError(f"--lr-min ({self.lr_min}) must not exceed --lr ({self.lr}): it is the learning rate "
                             f"the cosine schedule ends at")


# Ranges of the numeric settings: (field, (low, closed?), (high, closed?)); None: unbounded on that side.
NUMBER_RANGES = (
    ("momentum", (0, True), (1, False)), ("lr_gamma", (0, False), (1, True)), ("lr_min", (0, True), None),
    ("lr_step_size", (1, True), None), ("lr_warmup_decay", (0, False), (1, True)),
    ("label_smoothing", (0, True), (1, False)), ("norm_weight_decay", (0, True), None),
    ("bias_weight_decay", (0, True), None), ("transformer_embedding_decay", (0, True), None),
    ("random_erase", (0, True), (1, True)), ("seed", (0, True), (2 ** 32 - 1, True)),
    ("width", (1, True), (4096, True)), ("train_crop_size", (1, True), (8192, True)),
    ("val_resize_size", (1, True), (8192, True)), ("body_lr_scale", (0, False), (1, True)),
)
FLAG_NAMES = {"weight_decay": "--wd", "batch_size": "--batch-size"}


def _flag(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _within(value, low, high) -> bool:
    ok_low = low is None or (value >= low[0] if low[1] else value > low[0])
    ok_high = high is None or (value <= high[0] if high[1] else value < high[0])
    return ok_low and ok_high


def _interval(low, high) -> str:
    left = "(-inf" if low is None else ("[" if low[1] else "(") + f"{low[0]}"
    right = "inf)" if high is None else f"{high[0]}" + ("]" if high[1] else ")")
    return f"{left}, {right}"



# ----- one training step per method -------------------------------------------------------------------
@contextlib.contextmanager
def frozen_running_stats(norms: list[nn.Module]):
    """Batch norms keep normalizing with batch statistics but do not update their running statistics
    (momentum 0 leaves them unchanged)."""
    saved = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, saved):
            norm.momentum = momentum


def single_norms(net: nn.Module) -> list[nn.Module]:
    """Batch norms with no skip-aware twin (the stem's, the shortcut projections', the head's) and
    that are not twins themselves: each serves every sub-network with one set of running statistics."""
    twins = {id(m.twin) for m in net.modules() if isinstance(m, SkipAwareNorm)}
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not isinstance(m, SkipAwareNorm) and id(m) not in twins and m.momentum is not None]


def adn_step(net, images, targets, criterion: SubPathDistillationLoss, bn_stats_from: str = "super",
             precision: Precision = FLOAT32) -> dict:
    """One step of Algorithm 1 (without the optimizer update); leaves gradients in ``.grad`` and the
    network at the depth it had. ``precision``: autocast and loss scaling (``--amp``)."""
    n = net.num_stages
    with net.skipping(net.skip), net.capture_stage_outputs() as stage_outputs:
        net.skip = SkipConfig.super_net(n)
        with precision.autocast():
            super_logits = net(images)
            super_features = [h.detach() for h in stage_outputs]
            teacher_loss, terms = criterion.teacher_loss(super_logits, targets)
        precision.backward(teacher_loss)  # frees the super-net's activations before the base-net runs
        super_logits = super_logits.detach()

        net.skip = SkipConfig.base_net(n)
        freeze = single_norms(net) if bn_stats_from == "super" else []
        with frozen_running_stats(freeze), precision.autocast():
            base_logits = net(images)
            student_loss, student_terms = criterion.student_loss(base_logits, list(stage_outputs), super_logits,
                                                                 super_features, targets)
        precision.backward(student_loss)
    terms.update(student_terms)
    terms["loss"] = teacher_loss.detach() + student_loss.detach()
    return {"terms": _floats(terms), "logits": {"super": super_logits, "base": base_logits.detach()}}


def _floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device-to-host copy (one CUDA synchronisation) for all loss terms of a step."""
    keys = list(terms)
    values = torch.stack([terms[k].float() for k in keys]).tolist()
    return dict(zip(keys, values))


def joint_step(net, images, targets, criterion: nn.Module, precision: Precision = FLOAT32) -> dict:
    n = net.num_stages
    terms, logits = {}, {}
    for name, config in (("super", SkipConfig.super_net(n)), ("base", SkipConfig.base_net(n))):
        with precision.autocast():
            output = net(images, skip=config)
            ce = criterion(output, targets)
        precision.backward(0.5 * ce)
        terms[f"ce_{name}"] = ce.detach()
        logits[name] = output.detach()
    terms["loss"] = 0.5 * (terms["ce_super"] + terms["ce_base"])
    return {"terms": _floats(terms), "logits": logits}


def individual_step(net, images, targets, criterion: nn.Module, precision: Precision = FLOAT32) -> dict:
    with precision.autocast():
        output = net(images)  # at the depth fixed by net.skip
        loss = criterion(output, targets)
    precision.backward(loss)
    return {"terms": _floats({"loss": loss.detach()}), "logits": {str(net.skip): output.detach()}}


# ----- optimizer and schedule, named as in torchvision's reference scripts ---------------------------------
def parameter_groups(net: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Weight decay per parameter, as torchvision's ``set_weight_decay``: norm parameters (twins
    included), biases and transformer embeddings can each get their own decay."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    groups: dict[float, list[nn.Parameter]] = {}
    for module in net.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            decay = cfg.weight_decay
            if cfg.transformer_embedding_decay is not None and name in EMBEDDING_PARAMETERS:
                decay = cfg.transformer_embedding_decay
            elif cfg.norm_weight_decay is not None and isinstance(module, norm_types):
                decay = cfg.norm_weight_decay
            elif cfg.bias_weight_decay is not None and name == "bias":
                decay = cfg.bias_weight_decay
            groups.setdefault(decay, []).append(parameter)
    return [{"params": params, "weight_decay": decay} for decay, params in groups.items()]


def build_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(net, cfg)
    if cfg.body_lr_scale != 1.0:
        groups = scale_body_lr(groups, net, cfg.lr, cfg.body_lr_scale)
    if cfg.opt == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.opt == "rmsprop":  # torchvision's settings for MobileNet recipes
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, eps=0.0316, alpha=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_batch_mixer(cfg: TrainConfig, num_classes: int):
    """MixUp and/or CutMix on whole batches (torchvision.transforms.v2), or None."""
    from torchvision.transforms import v2
    mixers = []
    if cfg.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def build_ema(net: nn.Module, cfg: TrainConfig, world_size: int = 1):
    """An exponential moving average of the weights (and buffers), updated every ``model_ema_steps``
    steps, with torchvision's adjustment of the decay to the (global) batch size and run length."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    adjust = world_size * cfg.batch_size * cfg.model_ema_steps / cfg.epochs
    alpha = min(1.0, (1.0 - cfg.model_ema_decay) * adjust)
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(1.0 - alpha), use_buffers=True)


def build_scheduler(optimizer, cfg: TrainConfig):
    """Stepped once per epoch, like torchvision's reference classification script."""
    main_epochs = cfg.epochs - cfg.lr_warmup_epochs
    if cfg.lr_scheduler == "cosineannealinglr":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs, eta_min=cfg.lr_min)
    elif cfg.lr_scheduler == "steplr":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)
    elif cfg.lr_scheduler == "multisteplr":
        # Milestones count from the end of warm-up, like the other schedules' epochs.
        main = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_steps), gamma=cfg.lr_gamma)
    elif cfg.lr_scheduler == "exponentiallr":
        main = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_gamma)
    else:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if cfg.lr_warmup_epochs == 0:
        return main
    if cfg.lr_warmup_method == "linear":
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=cfg.lr_warmup_decay,
                                                   total_iters=cfg.lr_warmup_epochs)
    else:
        warmup = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=cfg.lr_warmup_decay,
                                                     total_iters=cfg.lr_warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[cfg.lr_warmup_epochs])


# ----- the run ----------------------------------------------------------------------------------------------
def _meta(cfg: TrainConfig, data) -> dict:
    model_kwargs = {"width": cfg.width} if cfg.width else {}
    if cfg.model in NEEDS_IMAGE_SIZE:
        model_kwargs["image_size"] = data.image_size
    return {
        "model": cfg.model, "model_kwargs": model_kwargs, "num_classes": data.num_classes,
        "in_channels": data.in_channels, "image_size": data.image_size, "skip_aware_norm": cfg.skip_aware_norm,
        "method": cfg.method, "trained_skip": cfg.skip if cfg.method == "individual" else None,
        # absolute, so that `adn eval` finds the data from any working directory
        "dataset": cfg.data, "data_path": os.path.abspath(cfg.data_path) if cfg.data_path else None, "mean": list(data.mean), "std": list(data.std),
        "config": asdict(cfg),
        # what adn predict / adn serve need to answer about image files: output names, input preprocessing
        "class_names": dataset_class_names(cfg.data, cfg.data_path, data.num_classes),
        "preprocess": Preprocessing.for_training(cfg.data, data.image_size, data.in_channels, data.mean, data.std,
                                                 cfg.val_resize_size, cfg.interpolation).to_dict(),
    }


def _convert(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    try:
        return convert(model, skip_aware_norm=cfg.skip_aware_norm)
    except TypeError as error:  # a model family adn cannot give adaptive depth (the message lists those it can)
        raise ValueError(f"--model {cfg.model}: {error}") from error


def _check_output_dir(path: Path) -> None:
    """Fail before the (slow) data loading if the folder cannot be made or written; creates nothing."""
    check_writable(path)


def _check_input_fits(net: nn.Module, data, cfg: TrainConfig, device) -> None:
    """Run one image through the network before training, so that a size or channel mismatch is
    reported as such, not as an error from deep inside the model."""
    image = _first_readable(data.train)[0]
    try:
        with torch.no_grad():
            net.eval()(image[None].to(device))
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ValueError(f"{cfg.model} cannot process images of shape {tuple(image.shape)} from "
                         f"{data.description.split(' (')[0]} ({str(error).splitlines()[0][:200]}). Pick a model that fits the data "
                         f"(e.g. resnet20 for 28x28 images) or set the image size with --train-crop-size") from error
    finally:
        net.train()


def _channels_last_crash(net: nn.Module, device: torch.device) -> str | None:
    """The first layer that torch 2.14.1 mishandles in channels-last on CPU (None if none): the backward
    pass of a channels-last 1x1 convolution with stride > 1 and 2-7 input channels corrupts memory (the
    process dies with SIGSEGV or "double free"), e.g. the shortcut projections of resnet20 --width 4."""
    if device.type != "cpu":
        return None
    for name, module in net.named_modules():
        if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride != (1, 1)
                and 1 < module.in_channels < 8):
            return f"{name} is a strided 1x1 convolution with {module.in_channels} input channels"
    return None


def speed_settings(cfg: TrainConfig, net: nn.Module, device: torch.device) -> tuple[bool, bool, str]:
    """``(amp, channels_last, why)``: the flags as given, and where left unset (None), the fastest the
    hardware supports: bfloat16 autocast with channels-last where bfloat16 is native (1.66-1.70x faster
    training steps on an AVX512-BF16 CPU, benchmarks/training_speed.py), float32 otherwise."""
    crash = _channels_last_crash(net, device)
    if cfg.channels_last and crash:
        raise ValueError(f"--channels-last on CPU: {crash}, whose channels-last backward pass crashes in torch "
                         f"{torch.__version__} on CPU; drop --channels-last (it mainly speeds up GPUs) or use a "
                         f"wider model (e.g. --width 8)")
    native = native_bfloat16(device)
    amp = native if cfg.amp is None else cfg.amp
    wants_cl = amp and native if cfg.channels_last is None else cfg.channels_last
    channels_last = bool(wants_cl) and crash is None
    chosen = [name for name, value in (("amp", cfg.amp), ("channels-last", cfg.channels_last)) if value is None]
    why = ""
    if chosen:
        why = (f"{' and '.join(chosen)} chosen automatically ("
               + ("native bfloat16 on this device" if native else "no native bfloat16 on this device")
               + ("; channels-last off: " + crash if wants_cl and crash else "")
               + "; override with --amp/--no-amp, --channels-last/--no-channels-last)")
    return bool(amp), channels_last, why


def _first_readable(dataset):
    """The first sample that is not an unreadable image (``None``), for the input check."""
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is not None:
            return sample
    raise DataError("none of the training images could be read")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def train(cfg: TrainConfig) -> dict:
    """Run a training; returns the last epoch's metrics. Writes ``checkpoint.pt`` (every epoch and every
    ``save_every_steps`` steps) and ``log.jsonl`` (one line per epoch) in ``cfg.output_dir``. Under
    torchrun, every process calls this; rank 0 alone writes files and logs."""
    cfg.validate()
    world, device = setup_distributed(cfg.device)
    trainer = None
    try:
        trainer = Trainer(cfg, world, device)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        world.close()


class Trainer:
    """One training run: :meth:`__init__` sets everything up (restoring a checkpoint when resuming),
    :meth:`run` trains the remaining epochs."""

    def __init__(self, cfg: TrainConfig, world: Distributed, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.output = Path(cfg.output_dir)
        resume = load_checkpoint(cfg.resume) if cfg.resume else None  # fail early on a bad checkpoint
        world.on_main(lambda: _check_output_dir(self.output))
        rng.seed_all(cfg.seed)  # the same on every process: the same initial weights

        augmentation = Augmentation(cfg.auto_augment, cfg.random_erase, cfg.interpolation)
        data = load_dataset(cfg.data, cfg.data_path, train_subset=cfg.train_subset, val_subset=cfg.val_subset,
                            seed=cfg.seed, image_size=cfg.train_crop_size, val_resize_size=cfg.val_resize_size,
                            augment=augmentation, skip_bad_images=cfg.skip_bad_images,
                            val_from_train=cfg.val_from_train)
        self.meta = _meta(cfg, data)
        model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                            weights=cfg.weights, **self.meta["model_kwargs"])
        net = self.net = _convert(model, cfg).to(device)
        if cfg.init_from and resume is None:  # (on resume, the checkpoint's weights are the starting point)
            init_from(net, cfg.init_from, cfg.model, log=self.say)
        if cfg.method == "individual":
            net.skip = SkipConfig(cfg.skip, net.num_stages)
        _check_input_fits(net, data, cfg, device)
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
        self.start_epoch, self.global_step = 0, 0
        self.progress = EpochProgress(global_batch=cfg.batch_size * world.world_size)
        self.stop, self.stop_now = StopSignals(), False  # SIGINT/SIGTERM: save the steps done, then stop
        rng_state = self._load_state(resume) if resume is not None else None
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
            self.step = functools.partial(adn_step, bn_stats_from=cfg.bn_stats_from, precision=self.precision)
            self.loss_fn = SubPathDistillationLoss(cfg.alpha, cfg.temperature, cfg.feature_kd, cfg.label_smoothing,
                                                   channel_dim=net.adn_info["channel_dim"], base_ce=cfg.base_ce)
        else:
            step = joint_step if cfg.method == "joint" else individual_step
            self.step, self.loss_fn = functools.partial(step, precision=self.precision), criterion
        self.eval_configs = [net.skip] if cfg.method == "individual" else [SkipConfig.super_net(net.num_stages),
                                                                          SkipConfig.base_net(net.num_stages)]
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
        self.val_loader = eval_loader(val, cfg.batch_size, cfg.workers,
                                      collate_readable_pairs if cfg.skip_bad_images else None)
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

        # Only now, with every setting, the data and the model checked, is the folder made and claimed, so
        # that a failed start leaves nothing behind; the lock is held until close().
        if rng_state is not None:
            _restore_rng(rng_state, cfg.resume)
        elif world.rank > 0:  # dropout, MixUp, ... differ between processes (augmentation is per image)
            rng.seed_all(cfg.seed + 100_003 * world.rank)
        self.lock = None
        world.on_main(lambda: self._claim_output(resume))
        self.say(f"training {cfg.model} ({net.num_stages} stages, {2 ** net.num_stages} sub-networks) with "
                 f"method={cfg.method} on {data.description}: {len(data.train)} train / {len(data.val)} val images, "
                 f"device={device}, threads={torch.get_num_threads()}"
                 + (f", {world.world_size} processes x batch {cfg.batch_size}" + (" (sync-bn)" if cfg.sync_bn else "")
                    if world.enabled else "")
                 + (f", {self.precision}" if self.amp else ", float32")
                 + (", channels-last" if self.channels_last else "")
                 + (f", compiled ({cfg.compile_backend})" if cfg.compile else ""))
        if speed_note:
            self.say(speed_note)

    def say(self, message: str) -> None:
        if self.world.is_main:
            _log(message)

    def _load_state(self, resume: dict):
        """:meth:`_restore`, with a checkpoint whose training state is malformed (wrong types, missing
        entries) reported as such instead of a KeyError or TypeError from deep inside."""
        source = self.cfg.resume
        validate_meta(resume["meta"], source=str(source))
        _check_position(resume, source)
        try:
            return self._restore(resume)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
            raise CheckpointError(f"cannot resume from {source}: its training state is malformed ({type(error).__name__}: "
                                  f"{str(error).strip()[:200]}); it was not written by adn train or was altered. "
                                  f"Resume from another checkpoint") from error

    def _claim_output(self, resume: dict | None) -> None:
        """Lock the output folder (refusing another run's), then tidy what an interrupted run left there."""
        self.lock = claim_output_dir(self.output, self.cfg.resume, self.cfg.overwrite, log=_log)
        try:
            removed = remove_stale_temporaries(self.output)
            if removed:
                _log(f"removed {len(removed)} temporary file(s) left by an interrupted run in {self.output}")
            if resume is not None:
                _reconcile_log(self.output / "log.jsonl", self.start_epoch,
                               resume.get("metrics") if resume.get("step_in_epoch") is None else None)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output folder (the OS releases it too if the process dies)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ----- resuming ---------------------------------------------------------------------------------------
    def _restore(self, resume: dict):
        """Load a checkpoint's state into this run; returns this process's saved RNG state (or None)."""
        cfg, source = self.cfg, self.cfg.resume
        for key in ("model", "num_classes", "in_channels", "skip_aware_norm", "method", "model_kwargs"):
            if resume["meta"].get(key) != self.meta.get(key):
                raise CheckpointError(f"cannot resume from {source}: it was trained with {key}="
                                      f"{resume['meta'].get(key)!r}, this run has {key}={self.meta.get(key)!r}")
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
            self.start_epoch = resume["epoch"] + 1
            where = f"epoch {self.start_epoch + 1}"
        else:
            self.start_epoch = resume["epoch"]
            self.progress = EpochProgress(**resume["progress"])
            if self.progress.global_batch != cfg.batch_size * self.world.world_size:
                raise CheckpointError(
                    f"cannot resume mid-epoch from {source}: it was saved with {self.progress.global_batch} "
                    f"images per step (batch size x processes), this run has {cfg.batch_size} x "
                    f"{self.world.world_size}; use the same -b and number of processes, or resume from an "
                    f"epoch-end checkpoint")
            where = f"epoch {self.start_epoch + 1}, step {self.progress.steps + 1}"
        self.say(f"resumed from {source} at {where}")
        if self.start_epoch >= cfg.epochs:
            self.say(f"nothing to do: the checkpoint already finished {self.start_epoch} of {cfg.epochs} epochs")
        states = resume.get("rng") or ([resume["rng_state"]] if "rng_state" in resume else [])
        if self.world.rank < len(states):
            return states[self.world.rank]
        if states:
            self.say(f"the checkpoint holds RNG states of {len(states)} processes, this run has "
                     f"{self.world.world_size}: the others start from fresh seeds")
        return None

    # ----- training -----------------------------------------------------------------------------------------
    def run(self) -> dict:
        record: dict = {}
        with self.stop:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                progress = self.progress if epoch == self.start_epoch else EpochProgress(global_batch=self.progress.global_batch)
                record = self.train_epoch(epoch, progress)
                # A signal during validation: the epoch's checkpoint is written; stop before the next epoch.
                if epoch + 1 < self.cfg.epochs and self.world.sum([self._stop_requested()])[0] > 0:
                    raise self._interrupted(f"after epoch {epoch + 1}")
        return record

    def _stop_requested(self) -> float:
        return float(self.stop.signum is not None)

    def _interrupted(self, where: str) -> TrainingInterrupted:
        signum = self.stop.signum or signal.SIGINT  # (another process of the run may have got it)
        checkpoint = self.output / "checkpoint.pt"
        return TrainingInterrupted(f"{signal.Signals(signum).name} {where}: the steps done are saved in {checkpoint}",
                                   signum, checkpoint)

    def train_epoch(self, epoch: int, progress: EpochProgress) -> dict:
        cfg, world = self.cfg, self.world
        batches = EpochBatches(len(self.train_set), cfg.batch_size, cfg.seed, epoch, world.rank, world.world_size,
                               start=progress.steps, steps=cfg.max_steps_per_epoch)
        if self.in_memory:
            loader = training_batches(self.train_set, batches)
        else:
            self.train_set.epoch = epoch
            # The loader's own generator (seeded per epoch) seeds its workers, so creating it mid-epoch on
            # resume does not draw from the global RNG stream that dropout and MixUp use.
            loader = DataLoader(self.train_set, batch_sampler=batches, num_workers=cfg.workers,
                                collate_fn=collate_readable, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                                worker_init_fn=ignore_interrupts)
        self.net.train()
        started = time.perf_counter() - progress.seconds
        cpu_started = time.process_time() - progress.cpu_seconds

        def note_time() -> None:  # before a mid-epoch save, so that a resumed epoch's times stay whole
            progress.seconds = time.perf_counter() - started
            progress.cpu_seconds = time.process_time() - cpu_started

        bar = tqdm(loader, total=batches.steps, initial=progress.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and world.is_main), file=sys.stderr, leave=False)
        for images, targets, skipped in bar:
            if not self.train_step(images, targets, skipped, epoch, progress):
                continue
            self.global_step += 1
            bar.set_postfix(loss=f"{progress.sums['loss'] / progress.steps:.3f}", refresh=False)
            # SIGINT/SIGTERM (alone: as soon as it came; several processes: once all agree): keep the steps done
            if self.stop_now or (not world.enabled and self.stop.signum is not None):
                bar.close()
                note_time()
                self.save(epoch, progress)
                raise self._interrupted(f"at epoch {epoch + 1}, step {progress.steps} of {batches.steps}")
            if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0 and progress.steps < batches.steps:
                note_time()
                self.save(epoch, progress)
        bar.close()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        record = {"epoch": epoch + 1, "lr": lr, "steps": progress.steps,
                  **{f"train_{k}": v / max(progress.steps, 1) for k, v in progress.sums.items()},
                  **{f"train_acc1_{_label(k, self.net)}": 100.0 * v / max(progress.seen, 1)
                     for k, v in progress.correct.items()}}
        if cfg.skip_bad_images:
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
        record["epoch_time_s"] = time.perf_counter() - started
        record["epoch_cpu_s"] = time.process_time() - cpu_started
        self.save(epoch, progress, record)
        if world.is_main:
            _append_log(self.output / "log.jsonl", record)
            _log(_summary(record))
        return record

    def train_step(self, images, targets, skipped: int, epoch: int, progress: EpochProgress) -> bool:
        """One optimizer step on this process's share of a global batch; False if there was nothing to
        train on (all images of the batch unreadable and skipped)."""
        cfg, world = self.cfg, self.world
        if images is None:  # every image of this batch was unreadable (--skip-bad-images)
            if world.enabled:
                raise DataError(f"every image of a batch on process {world.rank} was unreadable; the processes "
                                f"cannot stay in step. Remove the unreadable files (named above)")
            progress.skipped_images += skipped
            return False
        images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = targets
        if self.mixer is not None:  # soft targets; accuracy is measured against the dominant label
            images, targets = self.mixer(images, targets)
            labels = targets.argmax(1)
        self.optimizer.zero_grad(set_to_none=True)
        result = self.step(self.net, images, targets, self.loss_fn)
        # One small all-reduce for the metrics: loss terms averaged, counts summed over processes; its last
        # number says whether any process was asked to stop, so that all of them stop after the same step.
        names, counts = list(result["terms"]), {k: int((v.argmax(1) == labels).sum()) for k, v in result["logits"].items()}
        totals = world.sum([*result["terms"].values(), *counts.values(), labels.numel(), skipped,
                            self._stop_requested()])
        self.stop_now = totals.pop() > 0
        terms = {k: v / world.world_size for k, v in zip(names, totals)}
        if not all(math.isfinite(v) for v in terms.values()):
            raise TrainingDiverged(f"loss is not finite at epoch {epoch + 1}, step {progress.steps + 1}: "
                                   + ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) + f". {self._kept()}; "
                                   f"try a lower --lr")
        world.average_gradients(self.net.parameters())
        if cfg.clip_grad_norm is not None:
            self.precision.unscale(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), cfg.clip_grad_norm)
        self.precision.step(self.optimizer)
        progress.steps += 1
        progress.seen += int(totals[len(names) + len(counts)])
        progress.skipped_images += int(totals[-1])
        for key, value in terms.items():
            progress.sums[key] = progress.sums.get(key, 0.0) + value
        for key, value in zip(counts, totals[len(names):]):
            progress.correct[key] = progress.correct.get(key, 0) + int(value)
        if self.ema is not None and progress.steps % cfg.model_ema_steps == 0:
            self.ema.update_parameters(self.net)
        return True

    def evaluate(self, model: nn.Module, recalibrate: bool = False) -> dict:
        self.world.average_buffers(model)
        return evaluate_accuracy(model, self.val_loader, self.eval_configs, device=self.device,
                                 sum_over_processes=self.world.sum_tensor if self.world.enabled else None,
                                 recalibrate=(self.calibration, self.cfg.recalibrate_bn) if recalibrate else None)

    # ----- checkpoints --------------------------------------------------------------------------------------
    def _kept(self) -> str:
        """What a run that stops on an error leaves: its last checkpoint, if it wrote one."""
        latest = self.output / "checkpoint.pt"
        if latest.is_file():
            return f"The last good checkpoint ({latest}) is kept"
        return "No checkpoint was written yet"

    def _check_finite_weights(self, epoch: int, progress: EpochProgress) -> None:
        """Never save non-finite weights: one step with a huge learning rate can leave the loss of that step
        finite and the weights NaN, and they would evaluate to plausible-looking accuracy later."""
        tensors = [t for t in self.net.state_dict().values() if t.is_floating_point()]
        if tensors and not bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
            bad = sum(not bool(t.isfinite().all()) for t in tensors)
            raise TrainingDiverged(f"{bad} of {len(tensors)} weight tensors became NaN or infinite by epoch "
                                   f"{epoch + 1}, step {progress.steps}; they were not saved. {self._kept()}; "
                                   f"try a lower --lr")

    def save(self, epoch: int, progress: EpochProgress, metrics: dict | None = None) -> None:
        """Write the checkpoint of an epoch's end (``metrics`` given) or of a step within the epoch.
        Every process takes part (their RNG states are gathered); rank 0 writes."""
        mid_epoch = metrics is None
        self._check_finite_weights(epoch, progress)
        if mid_epoch:  # what every process will load on resume, and what an uninterrupted run uses on
            self.world.average_buffers(self.net)
            if self.ema is not None:
                self.world.average_buffers(self.ema)
        rng_states = self.world.gather(rng.capture())
        if not self.world.is_main:
            return
        state = {"optimizer": self.optimizer.state_dict(), "epoch": epoch, "global_step": self.global_step,
                 "step_in_epoch": progress.steps if mid_epoch else None, "rng": rng_states}
        if mid_epoch:
            state["progress"] = asdict(progress)
        else:
            state["metrics"] = metrics
        if self.ema is not None:
            state["model_ema"] = self.ema.state_dict()
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.state_dict()
        save_rotating(self.output, checkpoint_payload(self.net, self.meta, **state), epoch + 1, progress.steps,
                      self.cfg.keep_last)


MAX_EPOCHS = 1_000_000  # a bound on positions read from checkpoints (the schedule is replayed epoch by epoch)


def _check_position(resume: dict, source) -> None:
    """The position fields of a checkpoint to resume from, before anything loops over them."""
    def bad(key: str, expected: str):
        raise CheckpointError(f"cannot resume from {source}: {key} = {str(resume.get(key))[:80]}, expected {expected}; "
                              f"it was not written by adn train or was altered")
    def count(value, high=2 ** 62) -> bool:
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


def _restore_rng(state, source) -> None:
    try:
        rng.restore(state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"cannot resume from {source}: its RNG state is malformed ({type(error).__name__}); it "
                              f"was not written by adn train or was altered") from error


# ----- the log: one JSON line per finished epoch, rewritten atomically ------------------------------------------
def _read_log(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by an older, non-atomic writer
                continue
    return records


def _write_log(path: Path, records: list[dict]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(jsonout.dumps(r) + "\n" for r in records)))


def _append_log(path: Path, record: dict) -> None:
    _write_log(path, _read_log(path) + [record])


def _reconcile_log(path: Path, finished_epochs: int, last: dict | None) -> None:
    """On resume: keep the log lines of the epochs the checkpoint has finished, and add the line of its
    last epoch if the run died between writing the checkpoint and the log."""
    records = [r for r in _read_log(path) if r.get("epoch", 0) <= finished_epochs]
    if last is not None and not any(r.get("epoch") == last.get("epoch") for r in records):
        records.append(last)
    if records or path.exists():
        _write_log(path, records)


def _label(skip: str, net) -> str:
    """'super' / 'base' for the two trained extremes, else the skip string."""
    config = SkipConfig(skip, net.num_stages)
    return "super" if config.is_super else "base" if config.is_base else str(config)


def _summary(record: dict) -> str:
    def accs(suffix: str) -> str:
        return " ".join(f"{k[len('val_acc1_'):len(k) - len(suffix)]}={v:.2f}%" for k, v in record.items()
                        if k.startswith("val_acc1_") and k.endswith(suffix) and (suffix or not k.endswith(("_recal", "_ema"))))
    recal, ema = accs("_recal"), accs("_ema")
    return (f"epoch {record['epoch']}: loss {record.get('train_loss', float('nan')):.4f}, val acc@1 {accs('')}"
            + (f" (recalibrated BN: {recal})" if recal else "") + (f" (EMA: {ema})" if ema else "")
            + f", {record['epoch_time_s']:.1f}s")


def config_from_dict(values: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})

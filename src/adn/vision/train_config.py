"""``adn train``'s settings (:class:`TrainConfig`), checked when made: every value in range, or an error that
names the flag."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

from ..core.distill import FEATURE_KD_MODES
from ..training.config import RunConfig, need
from ..training.methods import METHODS
from ..training.optim import OPTIMIZERS, SCHEDULERS
from ..training.precision import AMP_DTYPES
from .data import DATASETS


@dataclass
class TrainConfig(RunConfig):
    """Every setting of a training run; ``adn train`` flags map one to one (``--lr`` -> ``lr``). The fields
    every training command has (``output_dir``, ``resume``, ``overwrite``, ``keep_checkpoints``, ``seed``, ``lr``,
    ``progress``) come from :class:`adn.training.config.RunConfig`."""

    model: str = "resnet20"
    data: str = "fashion-mnist"
    data_path: str | None = None
    # joint: both depths on the labels, our reproduction's best from scratch (docs/reproduction.md); "adn" is the
    # paper's Algorithm 1 (with base_ce 0)
    method: str = "joint"
    skip: str = "super"  # the sub-network trained by method=individual
    skip_aware_norm: bool = True
    weights: str | None = None  # torchvision weights name, e.g. DEFAULT
    init_from: str | None = None  # weights file of a plain or adn network to start from (adn.init_from)
    width: int | None = None  # base width of the small ResNets
    epochs: int = 10
    batch_size: int = 128
    workers: int = 0
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    lr_scheduler: str = "cosineannealinglr"
    lr_step_size: int = 30
    lr_steps: tuple[int, ...] = ()  # multisteplr: epochs at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    lr_warmup_epochs: int = 0
    lr_warmup_method: str = "linear"
    lr_warmup_decay: float = 0.01
    body_lr_scale: float = 1.0  # learning rate of all but the classification head, as a factor of lr
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
    base_ce: float = 0.0  # deviation from the paper: label loss for the base-net too
    bn_stats_from: str = "super"  # which pass updates the running stats of norms without a twin
    train_subset: int | None = None
    val_subset: int | None = None
    val_from_train: int | None = None  # validate on N held-out training images, not the test split
    train_crop_size: int | None = None
    val_resize_size: int | None = None
    max_steps_per_epoch: int | None = None
    recalibrate_bn: int = 10  # per-epoch validation also with batch-norm statistics recomputed on N batches
    depth_statistics: bool | None = (
        None  # store per-depth batch-norm statistics at the end (None: for joint with twins)
    )
    depth_statistics_batches: int = 50  # training batches of 256 images per depth for them (adn recalibrate --batches)
    device: str = "auto"
    # scale and speed
    sync_bn: bool = False  # batch statistics over all processes (torchrun)
    amp: bool | None = None  # None: bfloat16 autocast where the hardware has native bfloat16
    amp_dtype: str = "auto"  # float16 on CUDA (with a GradScaler), bfloat16 on CPU
    channels_last: bool | None = None  # None: on where mixed precision is (and the layout is safe)
    compile: bool = False
    compile_backend: str = "inductor"
    # checkpoints
    save_every_steps: int | None = None
    skip_bad_images: bool = False

    def __post_init__(self):
        self.lr_steps = tuple(self.lr_steps)  # from the command line or a checkpoint's JSON: a list

    def validate(self) -> None:
        self._check_finite()
        super().validate()
        need(
            not (self.init_from and self.weights),
            "--init-from and --weights exclude each other: both give the starting weights",
        )
        need(
            bool(self.resume) or not self.init_from or os.path.isfile(self.init_from),
            f"--init-from {self.init_from}: no such file",
        )
        need(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.data in DATASETS, f"--data must be one of {', '.join(DATASETS)}, got {self.data!r}")
        need(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        need(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        need(self.weight_decay >= 0, f"--wd must be >= 0, got {self.weight_decay}")
        need(0 <= self.alpha <= 1, f"--alpha must be in [0, 1], got {self.alpha}")
        need(self.temperature > 0, f"--temperature must be positive, got {self.temperature}")
        need(0 <= self.base_ce <= 10, f"--base-ce must be in [0, 10], got {self.base_ce}")
        need(self.feature_kd in FEATURE_KD_MODES, f"--feature-kd must be one of {', '.join(FEATURE_KD_MODES)}")
        need(
            self.bn_stats_from in ("super", "both"),
            f"--bn-stats-from must be super or both, got {self.bn_stats_from!r}",
        )
        need(self.lr_scheduler in SCHEDULERS, f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}")
        need(
            self.lr_scheduler != "multisteplr" or bool(self.lr_steps),
            "--lr-scheduler multisteplr needs its milestones: add --lr-steps, e.g. --lr-steps 15 23 for 30 epochs",
        )
        # Milestones at or past --epochs are allowed (they never fire): a run trained in parts with a growing
        # --epochs (--resume) follows one schedule.
        need(
            all(step > 0 for step in self.lr_steps) and list(self.lr_steps) == sorted(set(self.lr_steps)),
            f"--lr-steps must be increasing positive epochs, got {' '.join(map(str, self.lr_steps))}",
        )
        need(self.opt in OPTIMIZERS, f"--opt must be one of {', '.join(OPTIMIZERS)}, got {self.opt!r}")
        need(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "--mixup-alpha and --cutmix-alpha must be >= 0")
        need(self.clip_grad_norm is None or self.clip_grad_norm > 0, "--clip-grad-norm must be positive")
        need(
            self.model_ema_steps >= 1 and 0 < self.model_ema_decay < 1,
            "--model-ema-steps must be >= 1 and --model-ema-decay in (0, 1)",
        )
        need(
            0 <= self.lr_warmup_epochs < self.epochs or self.lr_warmup_epochs == 0,
            f"--lr-warmup-epochs ({self.lr_warmup_epochs}) must be smaller than --epochs ({self.epochs})",
        )
        need(self.recalibrate_bn >= 0, f"--recalibrate-bn must be >= 0 (0: off), got {self.recalibrate_bn}")
        need(
            self.depth_statistics_batches >= 1,
            f"--depth-statistics-batches must be at least 1, got {self.depth_statistics_batches}",
        )
        need(
            self.val_from_train is None or self.val_from_train >= 1,
            "--val-from-train must be a positive number of images",
        )
        need(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "--max-steps-per-epoch must be >= 1")
        need(
            self.amp_dtype in AMP_DTYPES, f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {self.amp_dtype!r}"
        )
        need(
            self.save_every_steps is None or self.save_every_steps >= 1,
            f"--save-every-steps must be at least 1, got {self.save_every_steps}",
        )
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
            raise ValueError(
                f"--lr-min ({self.lr_min}) must not exceed --lr ({self.lr}): it is the learning rate "
                f"the cosine schedule ends at"
            )


# Ranges of the numeric settings: (field, (low, closed?), (high, closed?)); None: unbounded on that side.
NUMBER_RANGES = (
    ("momentum", (0, True), (1, False)),
    ("lr_gamma", (0, False), (1, True)),
    ("lr_min", (0, True), None),
    ("lr_step_size", (1, True), None),
    ("lr_warmup_decay", (0, False), (1, True)),
    ("label_smoothing", (0, True), (1, False)),
    ("norm_weight_decay", (0, True), None),
    ("bias_weight_decay", (0, True), None),
    ("transformer_embedding_decay", (0, True), None),
    ("random_erase", (0, True), (1, True)),
    ("seed", (0, True), (2**32 - 1, True)),
    ("width", (1, True), (4096, True)),
    ("train_crop_size", (1, True), (8192, True)),
    ("val_resize_size", (1, True), (8192, True)),
    ("body_lr_scale", (0, False), (1, True)),
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


def config_from_dict(values: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    if "keep_last" in values and "keep_checkpoints" not in values:  # a checkpoint written before the rename
        values = {**values, "keep_checkpoints": values["keep_last"]}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})

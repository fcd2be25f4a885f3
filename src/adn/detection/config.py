"""The settings of ``adn detect train`` (:class:`DetectTrainConfig`; flags map one to one)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.distill import FEATURE_KD_MODES
from ..training.config import RunConfig, need
from .backbone import DEFAULT_FPN_CHANNELS, DetectorName

METHODS = ("adn", "joint", "individual")
SCHEDULERS = ("multisteplr", "cosineannealinglr", "constant")
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class DetectTrainConfig(RunConfig):
    """Every setting of ``adn detect train`` (flags map one to one). Defaults: torchvision's detection
    reference recipe (``--lr 0.02`` is for 16 images per step; scale it with the global batch size)."""

    model: str = "maskrcnn_resnet50_fpn"
    data_path: str | None = None
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    output_dir: str = "runs/detect"
    method: str = "adn"
    skip: str = "super"  # the depth --method individual trains
    alpha: float = 0.5
    temperature: float = 1.0
    feature_kd: str = "spatial"
    bn_stats_from: str = "super"
    backbone_weights: str | None = None
    trainable_backbone_layers: int | None = None
    frozen_bn: bool | None = None
    skip_aware_norm: bool | None = None
    fpn_channels: int = DEFAULT_FPN_CHANNELS
    min_size: int = 800
    max_size: int = 1333
    rpn_proposals_train: int = 2000
    rpn_proposals_test: int = 1000
    box_batch_size_per_image: int = 512
    detections_per_image: int = 100
    hflip: bool = True
    epochs: int = 12
    batch_size: int = 2
    workers: int = 4
    opt: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_scheduler: str = "multisteplr"
    lr_steps: tuple[int, ...] = (8, 11)
    lr_gamma: float = 0.1
    lr_warmup_iters: int = 1000
    lr_warmup_factor: float = 0.001
    clip_grad_norm: float | None = None
    train_subset: int | None = None
    val_subset: int | None = None
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 2
    device: str = "auto"

    def validate(self) -> None:
        super().validate()
        DetectorName.parse(self.model)
        need(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(
            self.data_path is not None or (self.train_images and self.train_ann),
            "give --data-path (COCO layout: train2017/, annotations/instances_train2017.json) or both "
            "--train-images and --train-ann",
        )
        need(self.epochs >= 1 and self.batch_size >= 1, "--epochs and --batch-size must be at least 1")
        need(self.lr > 0 and self.weight_decay >= 0, "--lr must be positive and --wd >= 0")
        need(0 <= self.alpha <= 1, f"--alpha must be in [0, 1], got {self.alpha}")
        need(self.temperature > 0, f"--temperature must be positive, got {self.temperature}")
        need(self.feature_kd in FEATURE_KD_MODES, f"--feature-kd must be one of {', '.join(FEATURE_KD_MODES)}")
        need(self.bn_stats_from in ("super", "both"), "--bn-stats-from must be super or both")
        need(self.lr_scheduler in SCHEDULERS, f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}")
        need(self.opt in OPTIMIZERS, f"--opt must be one of {', '.join(OPTIMIZERS)}")
        need(
            self.min_size >= 32 and self.max_size >= self.min_size,
            "--min-size must be >= 32 and --max-size >= --min-size",
        )
        need(self.fpn_channels >= 8, f"--fpn-channels must be at least 8, got {self.fpn_channels}")
        need(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "--max-steps-per-epoch must be >= 1")
        need(
            self.lr_warmup_iters >= 0 and 0 < self.lr_warmup_factor <= 1,
            "--lr-warmup-iters must be >= 0 and --lr-warmup-factor in (0, 1]",
        )

    def detector_kwargs(self) -> dict:
        """Settings of torchvision's FasterRCNN/MaskRCNN constructor (stored in the checkpoint)."""
        return {
            "min_size": self.min_size,
            "max_size": self.max_size,
            "rpn_pre_nms_top_n_train": self.rpn_proposals_train,
            "rpn_post_nms_top_n_train": self.rpn_proposals_train,
            "rpn_pre_nms_top_n_test": self.rpn_proposals_test,
            "rpn_post_nms_top_n_test": self.rpn_proposals_test,
            "box_batch_size_per_image": self.box_batch_size_per_image,
            "box_detections_per_img": self.detections_per_image,
        }

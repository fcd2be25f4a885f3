"""``adn detect train``: Algorithm 1 adapted to detection (paper, section 4.5), and its baselines.

Per batch, ``--method adn``:

1. super-net: the detector's own losses (RPN objectness and box regression, RoI classification and box
   regression, masks for Mask R-CNN), summed and weighted ``alpha``; backward;
2. base-net: only the backbone runs again, on the very batch the super-net's backbone saw (resized,
   normalized, padded), and the loss is ``(1 - alpha) * sum_levels KL(P_super || P_base)`` over the FPN
   levels P2..P5, the super-net's side detached; backward.

The FPN levels play the role of the stage outputs h^s: the paper takes them "directly from the
backbone's FPN". There is no logits term: a detector's outputs are boxes, not one distribution.
Baselines as for classification: ``joint`` (both depths on the detection losses, 0.5 each) and
``individual --skip S`` (one fixed depth). Two backward passes per step, so peak memory is one
sub-network's.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..utils import jsonout
from ..training import rng
from ..utils.atomic import atomic_write
from ..errors import CheckpointError
from ..utils.checkpoint_file import checkpoint_payload, load_checkpoint
from ..vision.checkpoint import load_weights
from ..training.run_folder import save_rotating
from ..core.distill import FEATURE_KD_MODES, feature_kl
from ..training.distributed import Distributed, setup as setup_distributed
from ..training.sampling import EpochBatches, SeededSamples
from ..core.skip import SkipConfig
from ..errors import TrainingDiverged
from ..training.methods import frozen_running_stats, single_norms
from .backbone import DEFAULT_FPN_CHANNELS, DetectorName, build_detector, capture_backbone, stage_levels
from .checkpoint import TASK, build_from_meta, detector_meta
from .data import (CocoDetection, DataError, collate, eval_transforms, find_split, fixed_subset, load_annotations,
                   train_transforms)
from .evaluate import image_ids, predict, score

METHODS = ("adn", "joint", "individual")
LOGGED_METRICS = ("box_ap", "box_ap50", "mask_ap", "mask_ap50")  # per epoch, of each trained depth
SCHEDULERS = ("multisteplr", "cosineannealinglr", "constant")
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class DetectTrainConfig:
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
    skip: str = "super"                      # the depth --method individual trains
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
    seed: int = 0
    device: str = "auto"
    resume: str | None = None
    keep_last: int = 0
    progress: bool = True

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)
        DetectorName.parse(self.model)
        need(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.data_path is not None or (self.train_images and self.train_ann),
             "give --data-path (COCO layout: train2017/, annotations/instances_train2017.json) or both "
             "--train-images and --train-ann")
        need(self.epochs >= 1 and self.batch_size >= 1, "--epochs and --batch-size must be at least 1")
        need(self.lr > 0 and self.weight_decay >= 0, "--lr must be positive and --wd >= 0")
        need(0 <= self.alpha <= 1, f"--alpha must be in [0, 1], got {self.alpha}")
        need(self.temperature > 0, f"--temperature must be positive, got {self.temperature}")
        need(self.feature_kd in FEATURE_KD_MODES, f"--feature-kd must be one of {', '.join(FEATURE_KD_MODES)}")
        need(self.bn_stats_from in ("super", "both"), "--bn-stats-from must be super or both")
        need(self.lr_scheduler in SCHEDULERS, f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}")
        need(self.opt in OPTIMIZERS, f"--opt must be one of {', '.join(OPTIMIZERS)}")
        need(self.min_size >= 32 and self.max_size >= self.min_size, "--min-size must be >= 32 and --max-size >= --min-size")
        need(self.fpn_channels >= 8, f"--fpn-channels must be at least 8, got {self.fpn_channels}")
        need(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "--max-steps-per-epoch must be >= 1")
        need(self.lr_warmup_iters >= 0 and 0 < self.lr_warmup_factor <= 1,
             "--lr-warmup-iters must be >= 0 and --lr-warmup-factor in (0, 1]")

    def detector_kwargs(self) -> dict:
        """Settings of torchvision's FasterRCNN/MaskRCNN constructor (stored in the checkpoint)."""
        return {"min_size": self.min_size, "max_size": self.max_size,
                "rpn_pre_nms_top_n_train": self.rpn_proposals_train, "rpn_post_nms_top_n_train": self.rpn_proposals_train,
                "rpn_pre_nms_top_n_test": self.rpn_proposals_test, "rpn_post_nms_top_n_test": self.rpn_proposals_test,
                "box_batch_size_per_image": self.box_batch_size_per_image,
                "box_detections_per_img": self.detections_per_image}


# ----- one step per method -----------------------------------------------------------------------------------
def fpn_distillation(teacher: dict, student: dict, mode: str = "spatial", temperature: float = 1.0) -> torch.Tensor:
    """Sum over FPN levels P2..P5 of KL(teacher || student): softmax over the channels at each position
    (``spatial``) or of each image's pooled features (``pooled``); the teacher side is detached."""
    levels = stage_levels(teacher)
    total = student[levels[0]].new_zeros((), dtype=torch.float32)
    for level in levels:
        total = total + feature_kl(teacher[level].detach(), student[level], mode, temperature)
    return total


def adn_step(detector, images, targets, alpha: float = 0.5, feature_kd: str = "spatial", temperature: float = 1.0,
             bn_stats_from: str = "super") -> dict[str, torch.Tensor]:
    """One step of Algorithm 1 for a detector (no optimizer update): gradients left in ``.grad``, the
    detector back at the depth it had."""
    n = detector.num_stages
    with detector.skipping(detector.skip), capture_backbone(detector) as seen:
        detector.skip = SkipConfig.super_net(n)
        losses = detector(images, targets)
        task = sum(losses.values())
        (alpha * task).backward()  # frees the super-net's activations before the base-net runs
        teacher = {level: seen.features[level].detach() for level in stage_levels(seen.features)}
        batch = seen.images.detach()

        detector.skip = SkipConfig.base_net(n)
        # Norms without a twin (stem, shortcut projections, FPN) keep the super-net's running statistics.
        freeze = single_norms(detector.backbone) if bn_stats_from == "super" else []
        with frozen_running_stats(freeze):
            student = detector.backbone(batch)
        kd = fpn_distillation(teacher, student, feature_kd, temperature)
        ((1.0 - alpha) * kd).backward()
    terms = {k: v.detach() for k, v in losses.items()}
    terms.update(kd_fpn=kd.detach(), loss=alpha * task.detach() + (1.0 - alpha) * kd.detach())
    return terms


def joint_step(detector, images, targets) -> dict[str, torch.Tensor]:
    """The ablation without specialization: detection losses of both depths, 0.5 each."""
    n, terms = detector.num_stages, {}
    for name, config in (("super", SkipConfig.super_net(n)), ("base", SkipConfig.base_net(n))):
        task = sum(detector(images, targets, skip=config).values())
        (0.5 * task).backward()
        terms[f"loss_{name}"] = task.detach()
    terms["loss"] = 0.5 * (terms["loss_super"] + terms["loss_base"])
    return terms


def individual_step(detector, images, targets) -> dict[str, torch.Tensor]:
    """Plain training at the depth ``detector.skip`` fixes (the paper's individual baselines)."""
    losses = detector(images, targets)
    task = sum(losses.values())
    task.backward()
    return {**{k: v.detach() for k, v in losses.items()}, "loss": task.detach()}


def learning_rate(cfg: DetectTrainConfig, epoch: int, step: int, global_step: int, steps_per_epoch: int) -> float:
    """The schedule times a linear warm-up over the first iterations (as torchvision's reference: at
    most the first epoch). ``multisteplr`` drops at epoch milestones; ``cosineannealinglr`` decays every
    step (``step``: within the epoch) to 0 at the end. A pure function of the position, so resuming
    needs no scheduler state."""
    if cfg.lr_scheduler == "multisteplr":
        factor = cfg.lr_gamma ** sum(epoch >= milestone for milestone in cfg.lr_steps)
    elif cfg.lr_scheduler == "cosineannealinglr":
        factor = 0.5 * (1.0 + math.cos(math.pi * (epoch + step / steps_per_epoch) / cfg.epochs))
    else:
        factor = 1.0
    warmup = min(cfg.lr_warmup_iters, max(steps_per_epoch - 1, 0))
    if global_step < warmup:
        factor *= cfg.lr_warmup_factor + (1.0 - cfg.lr_warmup_factor) * global_step / warmup
    return cfg.lr * factor


# ----- the run -------------------------------------------------------------------------------------------------
def train_detector(cfg: DetectTrainConfig) -> dict:
    """Train; returns the last epoch's record. Writes ``checkpoint.pt`` and ``log.jsonl`` in
    ``cfg.output_dir`` each epoch. Under torchrun every process calls this; rank 0 writes."""
    cfg.validate()
    world, device = setup_distributed(cfg.device)
    try:
        return DetectionTrainer(cfg, world, device).run()
    finally:
        world.close()


class DetectionTrainer:
    def __init__(self, cfg: DetectTrainConfig, world: Distributed, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.output = Path(cfg.output_dir)
        resume = load_checkpoint(cfg.resume) if cfg.resume else None  # a bad checkpoint fails before any work
        rng.seed_all(cfg.seed)  # the same initial weights on every process
        name = DetectorName.parse(cfg.model)
        self.train_set, self.val_set, self.annotations = self._datasets(name.has_masks)
        categories = self.annotations["train"].categories
        if resume is None:
            detector = build_detector(cfg.model, len(categories) + 1, backbone_weights=cfg.backbone_weights,
                                      trainable_layers=cfg.trainable_backbone_layers, frozen_bn=cfg.frozen_bn,
                                      skip_aware_norm=cfg.skip_aware_norm, fpn_channels=cfg.fpn_channels,
                                      **cfg.detector_kwargs())
        else:
            self._check_resume(resume, categories)
            detector = build_from_meta(resume["meta"])
            load_weights(detector, resume["model"], source=cfg.resume)
        # Resuming, the detector is rebuilt from the checkpoint: its settings, not this run's flags, hold.
        self.meta = detector_meta(detector, categories,
                                  cfg.detector_kwargs() if resume is None else resume["meta"]["detector_kwargs"],
                                  method=cfg.method, trained_skip=cfg.skip if cfg.method == "individual" else None,
                                  backbone_weights=(str(cfg.backbone_weights) if resume is None and cfg.backbone_weights
                                                    else None if resume is None else resume["meta"].get("backbone_weights")),
                                  config=asdict(cfg))
        self.detector = detector.to(device)
        n = detector.num_stages
        if cfg.method == "individual":
            detector.skip = cfg.skip
            self.eval_configs = [detector.skip]
        else:
            self.eval_configs = [SkipConfig.super_net(n), SkipConfig.base_net(n)]
        self.step = {"adn": lambda d, x, t: adn_step(d, x, t, cfg.alpha, cfg.feature_kd, cfg.temperature, cfg.bn_stats_from),
                     "joint": joint_step, "individual": individual_step}[cfg.method]
        self.parameters = [p for p in detector.parameters() if p.requires_grad]
        if cfg.opt == "sgd":
            self.optimizer = torch.optim.SGD(self.parameters, lr=cfg.lr, momentum=cfg.momentum,
                                             weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.start_epoch, self.global_step = 0, 0
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.start_epoch, self.global_step = resume["epoch"] + 1, resume.get("global_step", 0)
            states = resume.get("rng") or []
            if world.rank < len(states):
                rng.restore(states[world.rank])
            self.say(f"resumed from {cfg.resume} at epoch {self.start_epoch + 1}")
        world.broadcast_module(detector)
        if world.rank > 0:  # RoI sampling draws differ between processes
            rng.seed_all(cfg.seed + 100_003 * world.rank)
        self.say(f"training {cfg.model} ({n} stages, {2 ** n} sub-networks) with method={cfg.method} on "
                 f"{len(self.train_set)} train / {len(self.val_set) if self.val_set else 0} val images, "
                 f"{len(categories)} classes, device={device}, threads={torch.get_num_threads()}"
                 + (f", {world.world_size} processes" if world.enabled else ""))

    def say(self, message: str) -> None:
        if self.world.is_main:
            print(message, file=sys.stderr, flush=True)

    def _datasets(self, masks: bool):
        cfg, found, annotations = self.cfg, {}, {}
        for split in ("train", "val"):
            images, ann = getattr(cfg, f"{split}_images"), getattr(cfg, f"{split}_ann")
            if not (images and ann) and cfg.data_path is not None:
                try:
                    images, ann = find_split(cfg.data_path, split)
                except DataError:
                    if split == "train":
                        raise
                    self.say(f"no validation split under {cfg.data_path}: training without evaluation")
            if images and ann:
                annotations[split] = load_annotations(ann, need_masks=masks)
                transforms = train_transforms(cfg.hflip) if split == "train" else eval_transforms()
                found[split] = CocoDetection(images, annotations[split], transforms, masks=masks and split == "train")
        if "val" in annotations:
            ours = [(c["id"], c["name"]) for c in annotations["train"].categories]
            theirs = [(c["id"], c["name"]) for c in annotations["val"].categories]
            if ours != theirs:
                raise DataError(f"the train and val annotation files list different categories ({len(ours)} vs "
                                f"{len(theirs)}, or other ids/names); both splits must share one category list")
        train = fixed_subset(found["train"], cfg.train_subset, cfg.seed)
        val = fixed_subset(found["val"], cfg.val_subset, cfg.seed + 1) if "val" in found else None
        return SeededSamples(train, cfg.seed), val, annotations

    def _check_resume(self, resume: dict, categories: list[dict]) -> None:
        meta, source = resume["meta"], self.cfg.resume
        if meta.get("task") != TASK:
            raise CheckpointError(f"cannot resume from {source}: it is not a detector checkpoint (adn detect train)")
        if meta["model"] != self.cfg.model or meta.get("method") != self.cfg.method:
            raise CheckpointError(f"cannot resume from {source}: it trained {meta['model']} with method "
                                  f"{meta.get('method')}, this run asks for {self.cfg.model} with {self.cfg.method}")
        if [c["id"] for c in meta["categories"]] != [c["id"] for c in categories]:
            raise CheckpointError(f"cannot resume from {source}: its categories differ from the training set's")

    def run(self) -> dict:
        record: dict = {}
        for epoch in range(self.start_epoch, self.cfg.epochs):
            record = self.train_epoch(epoch)
        return record

    def train_epoch(self, epoch: int) -> dict:
        cfg, world, detector = self.cfg, self.world, self.detector
        batches = EpochBatches(len(self.train_set), cfg.batch_size, cfg.seed, epoch, world.rank, world.world_size,
                               steps=cfg.max_steps_per_epoch)
        self.train_set.epoch = epoch
        loader = DataLoader(self.train_set, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        detector.train()
        started, sums, steps, lr = time.perf_counter(), {}, 0, cfg.lr
        bar = tqdm(loader, total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr, leave=False,
                   disable=not (cfg.progress and world.is_main))
        for images, targets in bar:
            lr = learning_rate(cfg, epoch, steps, self.global_step, batches.steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images = [image.to(self.device, non_blocking=True) for image in images]
            targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            self.optimizer.zero_grad(set_to_none=True)
            terms = self.step(detector, images, targets)
            names = list(terms)
            values = [v / world.world_size for v in world.sum(torch.stack([terms[k].float() for k in names]).tolist())]
            if not all(math.isfinite(v) for v in values):
                raise TrainingDiverged(f"loss is not finite at epoch {epoch + 1}, step {steps + 1}: "
                                       + ", ".join(f"{k}={v:.4g}" for k, v in zip(names, values))
                                       + f". The last good checkpoint ({self.output / 'checkpoint.pt'}) is kept; "
                                         f"try a lower --lr or a longer --lr-warmup-iters")
            world.average_gradients(self.parameters)
            if cfg.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.parameters, cfg.clip_grad_norm)
            self.optimizer.step()
            self.global_step += 1
            steps += 1
            for key, value in zip(names, values):
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}", refresh=False)
        bar.close()
        record = {"epoch": epoch + 1, "lr": lr, "steps": steps, **{f"train_{k}": v / max(steps, 1) for k, v in sums.items()}}
        world.average_buffers(detector)
        if self.val_set is not None:
            for skip, metrics in self.evaluate().items():
                label = _label(skip)
                record.update({f"val_{k}_{label}": v for k, v in metrics.items() if k in LOGGED_METRICS})
        record["epoch_time_s"] = time.perf_counter() - started
        self.save(epoch, steps, record)
        if world.is_main:
            _append_log(self.output / "log.jsonl", record)
            self.say(_summary(record))
        return record

    def evaluate(self) -> dict[str, dict[str, float]]:
        """AP of the trained depths on the validation set; each process detects on its share of the
        images and rank 0 scores them all."""
        world = self.world
        annotations = self.annotations["val"]
        results = predict(self.detector, self.val_set, self.eval_configs, annotations, self.device,
                          self.cfg.eval_batch_size, self.cfg.workers, shard=(world.rank, world.world_size))
        gathered = world.gather(results)
        if not world.is_main:
            return {}
        merged = {key: [entry for part in gathered for entry in part[key]] for key in results}
        return score(annotations, merged, self.detector.roi_heads.has_mask(), image_ids(self.val_set))

    def save(self, epoch: int, steps: int, record: dict) -> None:
        states = self.world.gather(rng.capture())
        if not self.world.is_main:
            return
        payload = checkpoint_payload(self.detector, self.meta, optimizer=self.optimizer.state_dict(), epoch=epoch,
                                     global_step=self.global_step, metrics=record, rng=states)
        save_rotating(self.output, payload, epoch + 1, steps, self.cfg.keep_last)


def _label(skip: str) -> str:
    config = SkipConfig(skip)
    return "super" if config.is_super else "base" if config.is_base else str(config)


def _summary(record: dict) -> str:
    aps = " ".join(f"{k[len('val_'):]}={v:.1f}" for k, v in record.items()
                   if k.startswith(("val_box_ap_", "val_mask_ap_")) and v is not None)
    return (f"epoch {record['epoch']}: loss {record.get('train_loss', float('nan')):.4f}"
            + (f", {aps}" if aps else "") + f", {record['epoch_time_s']:.1f}s")


def _append_log(path: Path, record: dict) -> None:
    """One JSON line per epoch; the file is rewritten atomically (a crash never leaves half a line)."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    lines = [line for line in lines if json.loads(line).get("epoch", 0) < record["epoch"]]  # drop lines a resume redoes
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines) + jsonout.dumps(record) + "\n"))

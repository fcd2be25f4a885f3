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

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..core.distill import feature_kl
from ..core.skip import SkipConfig
from ..errors import CheckpointError
from ..training import rng
from ..training.distributed import Distributed
from ..training.distributed import setup as setup_distributed
from ..training.epochs import EpochTask
from ..training.loop import Checkpoint, Period, RunLoop, check_output_dir
from ..training.methods import frozen_running_stats, single_norms
from ..training.sampling import SeededSamples
from ..utils.checkpoint_file import load_checkpoint
from ..vision.checkpoint import load_weights
from .backbone import DetectorName, build_detector, capture_backbone, stage_levels
from .checkpoint import TASK, build_from_meta, detector_meta
from .config import METHODS, OPTIMIZERS, SCHEDULERS, DetectTrainConfig
from .data import (
    CocoDetection,
    DataError,
    collate,
    eval_transforms,
    find_split,
    fixed_subset,
    load_annotations,
    train_transforms,
)
from .evaluate import image_ids, predict, score

__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "DetectTrainConfig",
    "DetectionTask",
    "adn_step",
    "fpn_distillation",
    "individual_step",
    "joint_step",
    "learning_rate",
    "train_detector",
]

LOGGED_METRICS = ("box_ap", "box_ap50", "mask_ap", "mask_ap50")  # per epoch, of each trained depth


# ----- one step per method -----------------------------------------------------------------------------------
def fpn_distillation(teacher: dict, student: dict, mode: str = "spatial", temperature: float = 1.0) -> torch.Tensor:
    """Sum over FPN levels P2..P5 of KL(teacher || student): softmax over the channels at each position
    (``spatial``) or of each image's pooled features (``pooled``); the teacher side is detached."""
    levels = stage_levels(teacher)
    total = student[levels[0]].new_zeros((), dtype=torch.float32)
    for level in levels:
        total = total + feature_kl(teacher[level].detach(), student[level], mode, temperature)
    return total


def adn_step(
    detector,
    images,
    targets,
    alpha: float = 0.5,
    feature_kd: str = "spatial",
    temperature: float = 1.0,
    bn_stats_from: str = "super",
) -> dict[str, torch.Tensor]:
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


# ----- the run: a task of adn.training.loop.RunLoop ------------------------------------------------------------
def train_detector(cfg: DetectTrainConfig) -> dict:
    """Train; returns the last epoch's record. Writes ``checkpoint.pt`` and ``log.jsonl`` in
    ``cfg.output_dir`` each epoch. Under torchrun every process calls this; rank 0 writes."""
    cfg.validate()
    world, device = setup_distributed(cfg.device)
    try:
        world.on_main(lambda: check_output_dir(cfg.output_dir))  # before the slow set-up; creates nothing
        task = DetectionTask(cfg, world, device)
        return RunLoop.of(task, cfg, world=world).run()
    finally:
        world.close()


@dataclass
class EpochProgress:
    """Where the current epoch stands; mid-epoch checkpoints hold it, so that a resumed epoch skips the
    batches already trained on and its logged means still cover every step."""

    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    global_batch: int = 0  # images per step over all processes; a mid-epoch resume needs the same


class DetectionTask(EpochTask):
    """``adn detect train`` as a :class:`~adn.training.loop.Task`: set-up (data, detector, optimizer,
    resuming), the step of the chosen method, evaluation and checkpoints."""

    log_key = "epoch"
    advice = "try a lower --lr or a longer --lr-warmup-iters"

    def __init__(self, cfg: DetectTrainConfig, world: Distributed, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        resume = load_checkpoint(cfg.resume) if cfg.resume else None  # a bad checkpoint fails before any work
        rng.seed_all(cfg.seed)  # the same initial weights on every process
        name = DetectorName.parse(cfg.model)
        self.train_set, self.val_set, self.annotations = self._datasets(name.has_masks)
        categories = self.annotations["train"].categories
        if resume is None:
            detector = build_detector(
                cfg.model,
                len(categories) + 1,
                backbone_weights=cfg.backbone_weights,
                trainable_layers=cfg.trainable_backbone_layers,
                frozen_bn=cfg.frozen_bn,
                skip_aware_norm=cfg.skip_aware_norm,
                fpn_channels=cfg.fpn_channels,
                **cfg.detector_kwargs(),
            )
        else:
            self._check_resume(resume, categories)
            detector = build_from_meta(resume["meta"])
            load_weights(detector, resume["model"], source=cfg.resume)
        # Resuming, the detector is rebuilt from the checkpoint: its settings, not this run's flags, hold.
        self.meta = detector_meta(
            detector,
            categories,
            cfg.detector_kwargs() if resume is None else resume["meta"]["detector_kwargs"],
            method=cfg.method,
            trained_skip=cfg.skip if cfg.method == "individual" else None,
            backbone_weights=(
                str(cfg.backbone_weights)
                if resume is None and cfg.backbone_weights
                else None
                if resume is None
                else resume["meta"].get("backbone_weights")
            ),
            config=asdict(cfg),
        )
        self.module = self.detector = detector.to(device)
        n = detector.num_stages
        if cfg.method == "individual":
            detector.skip = cfg.skip
            self.eval_configs = [detector.skip]
        else:
            self.eval_configs = [SkipConfig.super_net(n), SkipConfig.base_net(n)]
        self.step_fn = {
            "adn": lambda d, x, t: adn_step(d, x, t, cfg.alpha, cfg.feature_kd, cfg.temperature, cfg.bn_stats_from),
            "joint": joint_step,
            "individual": individual_step,
        }[cfg.method]
        self.parameters = [p for p in detector.parameters() if p.requires_grad]
        if cfg.opt == "sgd":
            self.optimizer = torch.optim.SGD(
                self.parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(self.parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.start_epoch, self.global_step, self.lr = 0, 0, cfg.lr
        self.progress = EpochProgress(global_batch=cfg.batch_size * world.world_size)
        self.epoch, self.batches, self.started, self.resumed_at = 0, None, time.perf_counter(), None
        restored_rng = self._restore(resume) if resume is not None else False
        world.broadcast_module(detector)
        if world.rank > 0 and not restored_rng:  # RoI sampling draws differ between processes
            rng.seed_all(cfg.seed + 100_003 * world.rank)
        self.say(
            f"training {cfg.model} ({n} stages, {2**n} sub-networks) with method={cfg.method} on "
            f"{len(self.train_set)} train / {len(self.val_set) if self.val_set else 0} val images, "
            f"{len(categories)} classes, device={device}, threads={torch.get_num_threads()}"
            + (f", {world.world_size} processes" if world.enabled else "")
        )

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
                raise DataError(
                    f"the train and val annotation files list different categories ({len(ours)} vs "
                    f"{len(theirs)}, or other ids/names); both splits must share one category list"
                )
        train = fixed_subset(found["train"], cfg.train_subset, cfg.seed)
        val = fixed_subset(found["val"], cfg.val_subset, cfg.seed + 1) if "val" in found else None
        return SeededSamples(train, cfg.seed), val, annotations

    def _check_resume(self, resume: dict, categories: list[dict]) -> None:
        meta, source = resume["meta"], self.cfg.resume
        if meta.get("task") != TASK:
            raise CheckpointError(f"cannot resume from {source}: it is not a detector checkpoint (adn detect train)")
        if meta["model"] != self.cfg.model or meta.get("method") != self.cfg.method:
            raise CheckpointError(
                f"cannot resume from {source}: it trained {meta['model']} with method "
                f"{meta.get('method')}, this run asks for {self.cfg.model} with {self.cfg.method}"
            )
        if [c["id"] for c in meta["categories"]] != [c["id"] for c in categories]:
            raise CheckpointError(f"cannot resume from {source}: its categories differ from the training set's")

    def _restore(self, resume: dict) -> bool:
        """Load a checkpoint's training state (an epoch's end or a step within it); True if this process's
        RNG state was restored."""
        source = self.cfg.resume
        try:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.global_step = int(resume.get("global_step", 0))
            step = resume.get("step_in_epoch")
            if step is None:  # an epoch-end checkpoint
                where = self.resume_at(int(resume["epoch"]), resume.get("metrics"))
            else:
                progress = EpochProgress(**resume["progress"])
                progress.steps = int(step)
                where = self.resume_at(int(resume["epoch"]), progress=progress)
            states = resume.get("rng") or []
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"cannot resume from {source}: its training state is malformed ({type(error).__name__}: "
                f"{str(error).strip()[:200]}); it was not written by adn detect train or was "
                f"altered"
            ) from error
        self.check_global_batch(source)  # (outside the try: its CheckpointError is a ValueError)
        self.say(f"resumed from {source} at {where}")
        if self.world.rank < len(states):
            rng.restore(states[self.world.rank])
            return True
        return False

    # ----- the Task protocol (resumed, start, periods: EpochTask's) ---------------------------------------------
    def period(self, epoch: int) -> Period:
        self.begin_epoch(epoch)
        loader = self.epoch_loader(collate)
        self.detector.train()
        self.started = time.perf_counter() - self.progress.seconds
        return self.epoch_period(loader)

    def step(self, batch) -> dict[str, float]:
        images, targets = batch
        self.lr = learning_rate(self.cfg, self.epoch, self.progress.steps, self.global_step, self.batches.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.step_fn(self.detector, images, targets)
        names = list(terms)
        totals = self.world.sum(torch.stack([terms[k].float() for k in names]).tolist())
        return {k: v / self.world.world_size for k, v in zip(names, totals)}

    def update(self, terms: dict[str, float]) -> None:
        self.world.average_gradients(self.parameters)
        if self.cfg.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.parameters, self.cfg.clip_grad_norm)
        self.optimizer.step()
        self.global_step += 1
        self.progress.steps += 1
        for key, value in terms.items():
            self.progress.sums[key] = self.progress.sums.get(key, 0.0) + value

    def save_due(self) -> bool:
        return False

    def end_period(self, epoch: int) -> dict:
        steps, sums = self.progress.steps, self.progress.sums
        record = {
            "epoch": epoch + 1,
            "lr": self.lr,
            "steps": steps,
            **{f"train_{k}": v / max(steps, 1) for k, v in sums.items()},
        }
        self.world.average_buffers(self.detector)
        if self.val_set is not None:
            for skip, metrics in self.evaluate().items():
                label = _label(skip)
                record.update({f"val_{k}_{label}": v for k, v in metrics.items() if k in LOGGED_METRICS})
        record["epoch_time_s"] = time.perf_counter() - self.started
        self.say(_summary(record))
        return record

    def where(self, pending: bool) -> str:
        total = f" of {self.batches.steps}" if self.batches is not None else ""
        return f"at epoch {self.epoch + 1}, step {self.progress.steps + int(pending)}{total}"

    def checkpoint(self, record: dict | None) -> Checkpoint | None:
        """The checkpoint of an epoch's end (``record`` given) or of a step within it; every process takes
        part (their RNG states are gathered), rank 0 gets it."""
        mid_epoch = record is None
        if mid_epoch:  # what every process will load on resume
            self.world.average_buffers(self.detector)
        states = self.world.gather(rng.capture())
        if not self.world.is_main:
            return None
        if mid_epoch:
            self.progress.seconds = time.perf_counter() - self.started
        return self.epoch_checkpoint(record, states)

    def evaluate(self) -> dict[str, dict[str, float]]:
        """AP of the trained depths on the validation set; each process detects on its share of the
        images and rank 0 scores them all."""
        world = self.world
        annotations = self.annotations["val"]
        results = predict(
            self.detector,
            self.val_set,
            self.eval_configs,
            annotations,
            self.device,
            self.cfg.eval_batch_size,
            self.cfg.workers,
            shard=(world.rank, world.world_size),
        )
        gathered = world.gather(results)
        if not world.is_main:
            return {}
        merged = {key: [entry for part in gathered for entry in part[key]] for key in results}
        return score(annotations, merged, self.detector.roi_heads.has_mask(), image_ids(self.val_set))


def _label(skip: str) -> str:
    config = SkipConfig(skip)
    return "super" if config.is_super else "base" if config.is_base else str(config)


def _summary(record: dict) -> str:
    aps = " ".join(
        f"{k[len('val_') :]}={v:.1f}"
        for k, v in record.items()
        if k.startswith(("val_box_ap_", "val_mask_ap_")) and v is not None
    )
    return (
        f"epoch {record['epoch']}: loss {record.get('train_loss', float('nan')):.4f}"
        + (f", {aps}" if aps else "")
        + f", {record['epoch_time_s']:.1f}s"
    )

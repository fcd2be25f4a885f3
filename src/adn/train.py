"""``adn train``: Algorithm 1 (sub-path specialization) and the paper's baselines and ablations.

One epoch loop, three step functions:
- ``adn``: super-net forward + backward (alpha * CE), then base-net forward + backward
  ((1 - alpha) * KL terms against the detached super-net). Two backward passes, so the peak memory
  is that of one sub-network; the gradients equal those of the paper's single loss.
- ``joint`` (ablation without specialization): (CE(super) + CE(base)) / 2, also in two passes.
- ``individual`` (baseline): plain training of one fixed sub-network.
Skip-aware norms off (``skip_aware_norm=False``) is the other ablation.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from .convert import convert
from .data import DATASETS, Augmentation, load_dataset
from .distill import FEATURE_KD_MODES, SubPathDistillationLoss
from .evaluate import evaluate_accuracy
from .layers import SkipAwareNorm
from .models import NEEDS_IMAGE_SIZE, build_model
from .skip import SkipConfig

METHODS = ("adn", "joint", "individual")
SCHEDULERS = ("cosineannealinglr", "steplr", "exponentiallr", "constant")
OPTIMIZERS = ("sgd", "adamw", "rmsprop")
# Parameters that --transformer-embedding-decay applies to (torchvision ViT and Swin names).
EMBEDDING_PARAMETERS = ("class_token", "pos_embedding", "relative_position_bias_table", "absolute_pos_embed")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


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
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    lr_warmup_epochs: int = 0
    lr_warmup_method: str = "linear"
    lr_warmup_decay: float = 0.01
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
    bn_stats_from: str = "super"       # which pass updates the running stats of norms without a twin
    train_subset: int | None = None
    val_subset: int | None = None
    train_crop_size: int | None = None
    val_resize_size: int | None = None
    max_steps_per_epoch: int | None = None
    seed: int = 0
    device: str = "auto"
    resume: str | None = None
    progress: bool = True

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)
        need(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.data in DATASETS, f"--data must be one of {', '.join(DATASETS)}, got {self.data!r}")
        need(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        need(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.weight_decay >= 0, f"--wd must be >= 0, got {self.weight_decay}")
        need(0 <= self.alpha <= 1, f"--alpha must be in [0, 1], got {self.alpha}")
        need(self.temperature > 0, f"--temperature must be positive, got {self.temperature}")
        need(self.feature_kd in FEATURE_KD_MODES, f"--feature-kd must be one of {', '.join(FEATURE_KD_MODES)}")
        need(self.bn_stats_from in ("super", "both"), f"--bn-stats-from must be super or both, got {self.bn_stats_from!r}")
        need(self.lr_scheduler in SCHEDULERS, f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}")
        need(self.opt in OPTIMIZERS, f"--opt must be one of {', '.join(OPTIMIZERS)}, got {self.opt!r}")
        need(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "--mixup-alpha and --cutmix-alpha must be >= 0")
        need(self.clip_grad_norm is None or self.clip_grad_norm > 0, "--clip-grad-norm must be positive")
        need(self.model_ema_steps >= 1 and 0 < self.model_ema_decay < 1,
             "--model-ema-steps must be >= 1 and --model-ema-decay in (0, 1)")
        need(0 <= self.lr_warmup_epochs < self.epochs or self.lr_warmup_epochs == 0,
             f"--lr-warmup-epochs ({self.lr_warmup_epochs}) must be smaller than --epochs ({self.epochs})")
        need(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "--max-steps-per-epoch must be >= 1")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def adn_step(net, images, targets, criterion: SubPathDistillationLoss, bn_stats_from: str = "super") -> dict:
    """One step of Algorithm 1 (without the optimizer update); leaves gradients in ``.grad`` and the
    network at the depth it had."""
    n = net.num_stages
    with net.skipping(net.skip), net.capture_stage_outputs() as stage_outputs:
        net.skip = SkipConfig.super_net(n)
        super_logits = net(images)
        super_features = [h.detach() for h in stage_outputs]
        teacher_loss, terms = criterion.teacher_loss(super_logits, targets)
        teacher_loss.backward()  # frees the super-net's activations before the base-net runs
        super_logits = super_logits.detach()

        net.skip = SkipConfig.base_net(n)
        freeze = single_norms(net) if bn_stats_from == "super" else []
        with frozen_running_stats(freeze):
            base_logits = net(images)
        student_loss, student_terms = criterion.student_loss(base_logits, list(stage_outputs), super_logits, super_features)
        student_loss.backward()
    terms.update(student_terms)
    terms["loss"] = teacher_loss.detach() + student_loss.detach()
    return {"terms": _floats(terms), "logits": {"super": super_logits, "base": base_logits.detach()}}


def _floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device-to-host copy (one CUDA synchronisation) for all loss terms of a step."""
    keys = list(terms)
    values = torch.stack([terms[k].float() for k in keys]).tolist()
    return dict(zip(keys, values))


def joint_step(net, images, targets, criterion: nn.Module) -> dict:
    n = net.num_stages
    terms, logits = {}, {}
    for name, config in (("super", SkipConfig.super_net(n)), ("base", SkipConfig.base_net(n))):
        output = net(images, skip=config)
        ce = criterion(output, targets)
        (0.5 * ce).backward()
        terms[f"ce_{name}"] = ce.detach()
        logits[name] = output.detach()
    terms["loss"] = 0.5 * (terms["ce_super"] + terms["ce_base"])
    return {"terms": _floats(terms), "logits": logits}


def individual_step(net, images, targets, criterion: nn.Module) -> dict:
    output = net(images)  # at the depth fixed by net.skip
    loss = criterion(output, targets)
    loss.backward()
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


def build_ema(net: nn.Module, cfg: TrainConfig):
    """An exponential moving average of the weights (and buffers), updated every ``model_ema_steps``
    steps, with torchvision's adjustment of the decay to the batch size and run length."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    adjust = cfg.batch_size * cfg.model_ema_steps / cfg.epochs
    alpha = min(1.0, (1.0 - cfg.model_ema_decay) * adjust)
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(1.0 - alpha), use_buffers=True)


def build_scheduler(optimizer, cfg: TrainConfig):
    """Stepped once per epoch, like torchvision's reference classification script."""
    main_epochs = cfg.epochs - cfg.lr_warmup_epochs
    if cfg.lr_scheduler == "cosineannealinglr":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs, eta_min=cfg.lr_min)
    elif cfg.lr_scheduler == "steplr":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)
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
        "dataset": cfg.data, "data_path": cfg.data_path, "mean": list(data.mean), "std": list(data.std),
        "config": asdict(cfg),
    }


def _check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".adn-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write to output directory {path}: {error.strerror or error}; "
                         f"choose another --output-dir") from error


def _check_input_fits(net: nn.Module, data, cfg: TrainConfig, device) -> None:
    """Run one image through the network before training, so that a size or channel mismatch is
    reported as such, not as an error from deep inside the model."""
    image = data.train[0][0]
    try:
        with torch.no_grad():
            net.eval()(image[None].to(device))
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ValueError(f"{cfg.model} cannot process images of shape {tuple(image.shape)} from "
                         f"{data.description.split(' (')[0]} ({str(error).splitlines()[0][:200]}). Pick a model that fits the data "
                         f"(e.g. resnet20 for 28x28 images) or set the image size with --train-crop-size") from error
    finally:
        net.train()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(cfg: TrainConfig) -> dict:
    """Run a training; returns the last epoch's metrics. Writes ``checkpoint.pt`` (every epoch) and
    ``log.jsonl`` (one line per epoch) in ``cfg.output_dir``."""
    cfg.validate()
    device = resolve_device(cfg.device)
    output = Path(cfg.output_dir)
    resume = load_checkpoint(cfg.resume) if cfg.resume else None  # fail early on a bad checkpoint
    _check_output_dir(output)
    torch.manual_seed(cfg.seed)

    augmentation = Augmentation(cfg.auto_augment, cfg.random_erase, cfg.interpolation)
    data = load_dataset(cfg.data, cfg.data_path, train_subset=cfg.train_subset, val_subset=cfg.val_subset,
                        seed=cfg.seed, image_size=cfg.train_crop_size, val_resize_size=cfg.val_resize_size,
                        augment=augmentation)
    meta = _meta(cfg, data)
    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        weights=cfg.weights, **meta["model_kwargs"])
    net = convert(model, skip_aware_norm=cfg.skip_aware_norm).to(device)
    if cfg.method == "individual":
        net.skip = SkipConfig(cfg.skip, net.num_stages)
    _check_input_fits(net, data, cfg, device)
    optimizer = build_optimizer(net, cfg)
    ema = build_ema(net, cfg) if cfg.model_ema else None
    mixer = build_batch_mixer(cfg, data.num_classes)
    start_epoch = 0
    if resume is not None:
        for key in ("model", "num_classes", "in_channels", "skip_aware_norm", "method", "model_kwargs"):
            if resume["meta"].get(key) != meta.get(key):
                raise CheckpointError(f"cannot resume from {cfg.resume}: it was trained with {key}="
                                      f"{resume['meta'].get(key)!r}, this run has {key}={meta.get(key)!r}")
        load_weights(net, resume["model"], source=cfg.resume)
        optimizer.load_state_dict(resume["optimizer"])
        if ema is not None:
            if "model_ema" not in resume:
                raise CheckpointError(f"cannot resume with --model-ema from {cfg.resume}: it holds no EMA weights")
            ema.load_state_dict(resume["model_ema"])
        for group in optimizer.param_groups:  # the schedule below is recomputed from this run's settings
            group["lr"] = group["initial_lr"] = cfg.lr
        start_epoch = resume["epoch"] + 1
        if "rng_state" in resume:
            torch.set_rng_state(resume["rng_state"])
        _log(f"resumed from {cfg.resume} at epoch {start_epoch}")
        if start_epoch >= cfg.epochs:
            _log(f"nothing to do: the checkpoint already finished {start_epoch} of {cfg.epochs} epochs")

    # The learning rate is a function of (settings, epoch): on resume, replay the schedule up to the
    # saved epoch, so a run resumed with a larger --epochs follows the longer schedule.
    scheduler = build_scheduler(optimizer, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "step() before optimizer.step()"
        for _ in range(start_epoch):
            scheduler.step()

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if cfg.method == "adn":
        step = functools.partial(adn_step, bn_stats_from=cfg.bn_stats_from)
        loss_fn = SubPathDistillationLoss(cfg.alpha, cfg.temperature, cfg.feature_kd, cfg.label_smoothing,
                                          channel_dim=net.adn_info["channel_dim"])
    else:
        step, loss_fn = (joint_step if cfg.method == "joint" else individual_step), criterion
    eval_configs = [net.skip] if cfg.method == "individual" else [SkipConfig.super_net(net.num_stages),
                                                                   SkipConfig.base_net(net.num_stages)]
    val_loader = DataLoader(data.val, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers)
    _log(f"training {cfg.model} ({net.num_stages} stages, {2 ** net.num_stages} sub-networks) with method={cfg.method} "
         f"on {data.description}: {len(data.train)} train / {len(data.val)} val images, device={device}, "
         f"threads={torch.get_num_threads()}")

    record: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        # A sampler seeded by (seed, epoch) gives the same order whether or not the run was resumed.
        sampler = RandomSampler(data.train, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                            drop_last=len(data.train) > cfg.batch_size)
        net.train()
        started = time.perf_counter()
        sums: dict[str, float] = {}
        correct: dict[str, int] = {}
        seen = steps = 0
        total = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        bar = tqdm(loader, total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   file=sys.stderr, leave=False)
        for images, targets in bar:
            if steps >= total:
                break
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            labels = targets
            if mixer is not None:  # soft targets; accuracy is measured against the dominant label
                images, targets = mixer(images, targets)
                labels = targets.argmax(1)
            optimizer.zero_grad(set_to_none=True)
            result = step(net, images, targets, loss_fn)
            terms = result["terms"]
            if not all(math.isfinite(v) for v in terms.values()):
                raise TrainingDiverged(f"loss is not finite at epoch {epoch + 1}, step {steps + 1}: "
                                       + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                                       + f". The last good checkpoint ({output / 'checkpoint.pt'}) is kept; "
                                         f"try a lower --lr")
            if cfg.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            steps += 1
            seen += labels.numel()
            if ema is not None and steps % cfg.model_ema_steps == 0:
                ema.update_parameters(net)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value
            for name, logits in result["logits"].items():
                correct[name] = correct.get(name, 0) + (logits.argmax(1) == labels).sum()  # stays on device
            bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}", refresh=False)
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val = evaluate_accuracy(net, val_loader, eval_configs, device=device)
        record = {"epoch": epoch + 1, "lr": lr, "steps": steps,
                  **{f"train_{k}": v / max(steps, 1) for k, v in sums.items()},
                  **{f"train_acc1_{_label(k, net)}": 100.0 * int(v) / max(seen, 1) for k, v in correct.items()}}
        for skip, accs in val.items():
            record[f"val_acc1_{_label(skip, net)}"] = accs["acc1"]
            record[f"val_acc5_{_label(skip, net)}"] = accs["acc5"]
        if ema is not None:
            for skip, accs in evaluate_accuracy(ema.module, val_loader, eval_configs, device=device).items():
                record[f"val_acc1_{_label(skip, net)}_ema"] = accs["acc1"]
        record["epoch_time_s"] = time.perf_counter() - started
        extra = {"model_ema": ema.state_dict()} if ema is not None else {}
        save_checkpoint(output / "checkpoint.pt", net, meta, optimizer=optimizer.state_dict(), epoch=epoch,
                        metrics=record, rng_state=torch.get_rng_state(), **extra)
        with open(output / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        _log(_summary(record))
    return record


def _label(skip: str, net) -> str:
    """'super' / 'base' for the two trained extremes, else the skip string."""
    config = SkipConfig(skip, net.num_stages)
    return "super" if config.is_super else "base" if config.is_base else str(config)


def _summary(record: dict) -> str:
    accs = " ".join(f"{k[len('val_acc1_'):]}={v:.2f}%" for k, v in record.items() if k.startswith("val_acc1_"))
    return (f"epoch {record['epoch']}: loss {record.get('train_loss', float('nan')):.4f}, val acc@1 {accs}, "
            f"{record['epoch_time_s']:.1f}s")


def config_from_dict(values: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})

"""What a classification run builds before its first step: the optimizer (with ``--body-lr-scale``), MixUp /
CutMix, and the precision and memory layout that are fastest on the device."""
from __future__ import annotations

import torch
from torch import nn

from ..training.optim import parameter_groups
from ..training.precision import native_bfloat16
from .init_from import scale_body_lr
from .train_config import TrainConfig


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


def build_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(net, cfg)
    if cfg.body_lr_scale != 1.0:
        groups = scale_body_lr(groups, net, cfg.lr, cfg.body_lr_scale)
    if cfg.opt == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.opt == "rmsprop":  # torchvision's settings for MobileNet recipes
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, eps=0.0316, alpha=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr)


# ----- the run ----------------------------------------------------------------------------------------------
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

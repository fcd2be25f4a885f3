"""What a classification run builds before its first step: the checkpoint metadata, the converted network
(checked against one training image), the optimizer (with ``--body-lr-scale``), MixUp / CutMix, and the
precision and memory layout that are fastest on the device."""

from __future__ import annotations

import os
from dataclasses import asdict

import torch
from torch import nn

from ..convert import convert
from ..errors import DataError
from ..models import NEEDS_IMAGE_SIZE
from ..training.optim import parameter_groups
from ..training.precision import native_bfloat16
from .init_from import scale_body_lr
from .labels import dataset_class_names
from .preprocess import Preprocessing
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
        if (
            isinstance(module, nn.Conv2d)
            and module.kernel_size == (1, 1)
            and module.stride != (1, 1)
            and 1 < module.in_channels < 8
        ):
            return f"{name} is a strided 1x1 convolution with {module.in_channels} input channels"
    return None


def speed_settings(cfg: TrainConfig, net: nn.Module, device: torch.device) -> tuple[bool, bool, str]:
    """``(amp, channels_last, why)``: the flags as given, and where left unset (None), the fastest the
    hardware supports: bfloat16 autocast with channels-last where bfloat16 is native (1.66-1.70x faster
    training steps on an AVX512-BF16 CPU, benchmarks/training_speed.py), float32 otherwise."""
    crash = _channels_last_crash(net, device)
    if cfg.channels_last and crash:
        raise ValueError(
            f"--channels-last on CPU: {crash}, whose channels-last backward pass crashes in torch "
            f"{torch.__version__} on CPU; drop --channels-last (it mainly speeds up GPUs) or use a "
            f"wider model (e.g. --width 8)"
        )
    native = native_bfloat16(device)
    amp = native if cfg.amp is None else cfg.amp
    wants_cl = amp and native if cfg.channels_last is None else cfg.channels_last
    channels_last = bool(wants_cl) and crash is None
    chosen = [name for name, value in (("amp", cfg.amp), ("channels-last", cfg.channels_last)) if value is None]
    why = ""
    if chosen:
        why = (
            f"{' and '.join(chosen)} chosen automatically ("
            + ("native bfloat16 on this device" if native else "no native bfloat16 on this device")
            + ("; channels-last off: " + crash if wants_cl and crash else "")
            + "; override with --amp/--no-amp, --channels-last/--no-channels-last)"
        )
    return bool(amp), channels_last, why


def run_meta(cfg: TrainConfig, data) -> dict:
    """The checkpoint's ``meta``: what every later command needs to rebuild, evaluate and serve the network."""
    model_kwargs = {"width": cfg.width} if cfg.width else {}
    if cfg.model in NEEDS_IMAGE_SIZE:
        model_kwargs["image_size"] = data.image_size
    return {
        "model": cfg.model,
        "model_kwargs": model_kwargs,
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "skip_aware_norm": cfg.skip_aware_norm,
        "method": cfg.method,
        "trained_skip": cfg.skip if cfg.method == "individual" else None,
        # absolute, so that `adn eval` finds the data from any working directory
        "dataset": cfg.data,
        "data_path": os.path.abspath(cfg.data_path) if cfg.data_path else None,
        "mean": list(data.mean),
        "std": list(data.std),
        "config": asdict(cfg),
        # what adn predict / adn serve need to answer about image files: output names, input preprocessing
        "class_names": dataset_class_names(cfg.data, cfg.data_path, data.num_classes),
        "preprocess": Preprocessing.for_training(
            cfg.data, data.image_size, data.in_channels, data.mean, data.std, cfg.val_resize_size, cfg.interpolation
        ).to_dict(),
    }


def convert_for_training(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The model as an adaptive depth network, or an error that names ``--model``."""
    try:
        return convert(model, skip_aware_norm=cfg.skip_aware_norm)
    except TypeError as error:  # a model family adn cannot give adaptive depth (the message lists those it can)
        raise ValueError(f"--model {cfg.model}: {error}") from error


def check_input_fits(net: nn.Module, data, cfg: TrainConfig, device) -> None:
    """Run one image through the network before training, so that a size or channel mismatch is
    reported as such, not as an error from deep inside the model."""
    image = first_readable(data.train)[0]
    try:
        with torch.no_grad():
            net.eval()(image[None].to(device))
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ValueError(
            f"{cfg.model} cannot process images of shape {tuple(image.shape)} from "
            f"{data.description.split(' (')[0]} ({str(error).splitlines()[0][:200]}). Pick a model that fits the data "
            f"(e.g. resnet20 for 28x28 images) or set the image size with --train-crop-size"
        ) from error
    finally:
        net.train()


def first_readable(dataset):
    """The first sample that is not an unreadable image (``None``), for the input check."""
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is not None:
            return sample
    raise DataError("none of the training images could be read")

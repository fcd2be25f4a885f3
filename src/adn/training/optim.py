"""Optimizer parameter groups, EMA and learning-rate schedules, named as in torchvision's reference scripts.
``cfg`` is any run config with the fields used (weight_decay, lr_scheduler, ...)."""

from __future__ import annotations

import torch
from torch import nn

SCHEDULERS = ("cosineannealinglr", "steplr", "multisteplr", "exponentiallr", "constant")
OPTIMIZERS = ("sgd", "adamw", "rmsprop")
# Parameters that --transformer-embedding-decay applies to (torchvision ViT and Swin names).
EMBEDDING_PARAMETERS = ("class_token", "pos_embedding", "relative_position_bias_table", "absolute_pos_embed")


def parameter_groups(net: nn.Module, cfg) -> list[dict]:
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


def build_ema(net: nn.Module, cfg, world_size: int = 1):
    """An exponential moving average of the weights (and buffers), updated every ``model_ema_steps``
    steps, with torchvision's adjustment of the decay to the (global) batch size and run length."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    adjust = world_size * cfg.batch_size * cfg.model_ema_steps / cfg.epochs
    alpha = min(1.0, (1.0 - cfg.model_ema_decay) * adjust)
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(1.0 - alpha), use_buffers=True)


def build_scheduler(optimizer, cfg):
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
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=cfg.lr_warmup_decay, total_iters=cfg.lr_warmup_epochs
        )
    else:
        warmup = torch.optim.lr_scheduler.ConstantLR(
            optimizer, factor=cfg.lr_warmup_decay, total_iters=cfg.lr_warmup_epochs
        )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[cfg.lr_warmup_epochs])

"""Norm recalibration: recompute a sub-network's batch-norm running statistics before evaluating it.

A batch norm normalizes with batch statistics while training and with running averages at test time.
In an adaptive depth network, the running averages of a norm shared by several sub-networks (the stem's,
the shortcut projections', and every norm of a network trained without skip-aware twins) are collected
from the super-net's passes only, and those of the other depths (never trained explicitly) from none
at all; and while the weights still move fast (early epochs at a high learning rate) every running
average lags the weights it describes. Recalibration replaces them, for one depth at a time, by exact
averages over a few training batches run at that depth (the standard tool for weight-shared networks:
Once-for-All, universally slimmable networks).

``recalibrate_norms(net, batches, num_batches=N, skip=...)`` changes the network in place;
:func:`norm_state`/:func:`load_norm_state` save and restore the statistics around it, which is what
:func:`adn.evaluate.evaluate_accuracy` does with ``recalibrate=...`` for each sub-network it evaluates.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .skip import SkipConfig

BatchNorm = nn.modules.batchnorm._BatchNorm


def batch_norms(net: nn.Module) -> list[BatchNorm]:
    """Every batch norm that keeps running statistics (skip-aware twins included)."""
    return [m for m in net.modules() if isinstance(m, BatchNorm) and m.track_running_stats]


def norm_state(net: nn.Module) -> list[dict[str, torch.Tensor]]:
    """A copy of every batch norm's running statistics, for :func:`load_norm_state`."""
    return [{name: buffer.clone() for name, buffer in norm.named_buffers(recurse=False)} for norm in batch_norms(net)]


@torch.no_grad()
def load_norm_state(net: nn.Module, state: list[dict[str, torch.Tensor]]) -> None:
    for norm, saved in zip(batch_norms(net), state, strict=True):
        for name, buffer in norm.named_buffers(recurse=False):
            buffer.copy_(saved[name])


@torch.no_grad()
def recalibrate_norms(
    net: nn.Module, batches: Iterable, num_batches: int, skip=None, device: torch.device | str | None = None
) -> int:
    """Replace the running statistics of the batch norms that sub-network ``skip`` (default: the
    network's current depth) uses by their exact averages over the first ``num_batches`` batches of
    ``batches`` (``(images, targets)`` pairs, or images alone), run at that depth. Norms the sub-network
    does not use keep their statistics. Returns the number of images used (0 when the network has no
    batch norms, e.g. a ViT: there is nothing to recalibrate).

    Use training images without random augmentation, the same ones for every depth, and evaluate
    afterwards in eval mode; the result is then deterministic."""
    if num_batches < 1:
        raise ValueError(f"recalibration needs at least 1 batch, got {num_batches}")
    norms = batch_norms(net)
    if not norms:
        return 0
    if device is None:
        device = next(net.parameters()).device
    config = net.skip if skip is None else SkipConfig(skip, net.num_stages)
    before = norm_state(net)
    modes = {module: module.training for module in net.modules()}
    momenta = [norm.momentum for norm in norms]
    used = 0
    try:
        net.eval()  # dropout and stochastic depth off: only the norms see training mode
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: every batch weighs the same
            norm.train()
        with net.skipping(config):
            for index, batch in enumerate(batches):
                if index == num_batches:
                    break
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                net(images.to(device, non_blocking=True))
                used += images.shape[0]
        if used == 0:
            raise ValueError("recalibration got no batches; give a non-empty loader of training images")
    except BaseException:
        load_norm_state(net, before)
        raise
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    # A norm that this depth does not run saw no batch: it keeps the statistics it had. One that did,
    # and keeps a row per depth (adn.depth_statistics), gets the new statistics in this depth's row too.
    for norm, saved in zip(norms, before):
        if int(norm.num_batches_tracked) == 0:
            for name, buffer in norm.named_buffers(recurse=False):
                buffer.copy_(saved[name])
        elif "depth_running_mean" in norm._buffers:
            norm._buffers["depth_running_mean"][config.index] = norm._buffers["running_mean"]
            norm._buffers["depth_running_var"][config.index] = norm._buffers["running_var"]
    return used

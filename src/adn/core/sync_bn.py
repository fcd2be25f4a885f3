"""``--sync-bn``: batch norms that normalise with the statistics of the global batch (all processes).

Without it each process normalises with its own share of the batch, as torchvision's reference script
does by default. With it, a run on K processes computes what one process computes on the whole batch.

torch's :class:`torch.nn.SyncBatchNorm` runs on CUDA only, so CUDA runs use it and other devices (CPU
processes with Gloo) use :class:`GlobalBatchNorm` below. Conversion swaps classes in place, like
``adn.convert``: parameter names, skip-aware twins and the stages' references to their norms stay.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .layers import SkipAwareNorm, swap_in_subclass, original_class

PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward is again a sum over processes: every process's statistics feed
    every process's output, so each receives the gradients of all of them."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch, for any device. Each process computes its share's mean and
    centred sum of squares; one differentiable all-reduce shares them; Chan's formula combines them
    (no cancellation-prone E[x^2] - E[x]^2). The all-reduce's backward sums the gradients that flow
    into the shared statistics, which is what makes the gradients those of the global batch."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)  # evaluation or a single process: an ordinary batch norm
        self._check_input_dim(x)
        channels, shape = x.shape[1], [1, -1] + [1] * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        values = x if x.dtype in (torch.float32, torch.float64) else x.float()  # statistics in >= fp32
        mean = values.mean(dims)
        m2 = (values - mean.view(shape)).square().sum(dims)
        count = mean.new_full((1,), x.numel() // channels)
        # Row r of the table holds process r's (mean, m2, count); an all-reduce fills in every row.
        rank, world = dist.get_rank(), dist.get_world_size()
        rows = [torch.cat([mean, m2, count]) if r == rank else mean.new_zeros(2 * channels + 1) for r in range(world)]
        table = _SumOverProcesses.apply(torch.stack(rows))
        means, m2s, counts = table[:, :channels], table[:, channels:-1], table[:, -1:]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        global_var = (m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)) / total
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(global_mean.detach(), global_var.detach() * total / (total - 1).clamp(min=1))
        out = (values - global_mean.view(shape)) * torch.rsqrt(global_var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        # The same rule as nn.BatchNorm: exponential average, or cumulative when momentum is None.
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(net: nn.Module, device: torch.device) -> int:
    """Make every BatchNorm1d/2d/3d of ``net`` (skip-aware ones and their twins included) synchronise
    across processes, in place. Returns how many were converted."""
    target = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
    converted = 0
    for module in net.modules():
        if original_class(module) not in PLAIN_BATCH_NORMS:
            continue
        skip_aware = isinstance(module, SkipAwareNorm)
        module.__class__ = target
        if target is nn.SyncBatchNorm:
            module.process_group = None  # the attribute SyncBatchNorm.__init__ would have set: whole world
        if skip_aware:  # put the twin switching back on top of the new class
            swap_in_subclass(module, SkipAwareNorm, "SkipAware")
        converted += 1
    return converted

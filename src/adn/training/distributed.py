"""Data-parallel training across the processes torchrun starts (one per GPU, or several on CPUs).

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` joins the process group with
NCCL for CUDA devices and Gloo otherwise. Without those variables everything here is a no-op, so the
trainer has one code path.

Gradient synchronisation (why no ``DistributedDataParallel`` wrapper): a step of Algorithm 1 runs two
forward/backward passes through the same weights, the super-net (which never uses the skip-aware
norms' twins) and then the base-net (which never uses the skipped blocks). DDP expects one backward
per forward: synchronising in both passes doubles the traffic, and each pass leaves parameters without
gradients, which DDP only tolerates with ``find_unused_parameters=True`` (a walk over the autograd graph
every forward). So both passes accumulate gradients locally and :meth:`Distributed.average_gradients`
averages them once per step, in flat buckets, as DDP's reducer would. What is given up is DDP's
overlap of communication with the backward pass; the traffic is the same. Buffers (batch-norm running
statistics) are averaged before every evaluation and checkpoint instead of DDP's per-forward broadcast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb


@dataclass
class Distributed:
    """This process's place in the run. ``world_size == 1``: a single process, no collectives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives' tensors must live (NCCL: the GPU)
    owns_group: bool = False  # True when setup() created the process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----- collectives (all no-ops for a single process) -----------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over all processes (loss terms, counts): one small all-reduce."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (returned on the tensor's own device)."""
        if not self.enabled:
            return tensor
        reduced = tensor.to(self.device).clone()
        dist.all_reduce(reduced)
        return reduced.to(tensor.device)

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace every gradient by its mean over the processes. Parameters without a gradient are
        left alone; every process runs the same sub-networks, so the set is the same on all of them."""
        if self.enabled:
            _all_reduce_mean([p.grad for p in parameters if p.grad is not None], self.world_size)

    def average_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (batch-norm running statistics) over the processes. Each
        process normalised its own share of the batch, so its running mean is an average of its share's
        means; the average over processes is then the running mean of the global batches."""
        if self.enabled:
            _all_reduce_mean([b for b in module.buffers() if b.is_floating_point()], self.world_size)

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process (start of training and after resuming)."""
        if self.enabled:
            with torch.no_grad():
                for tensor in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(tensor.data, src=0)

    def gather(self, obj) -> list:
        """Every process's ``obj`` (small picklable state, e.g. RNG states), indexed by rank."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def on_main(self, action: Callable[[], None]) -> None:
        """Run ``action`` on rank 0 only (a check of the output folder) and raise its error on every
        process, so that all of them stop with the same message instead of the others waiting forever."""
        error = None
        if self.is_main:
            try:
                action()
            except ValueError as caught:
                error = caught
        if self.enabled:
            box = [None if error is None else str(error)]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and error is None:
                error = ValueError(box[0])
        if error is not None:
            raise error

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _all_reduce_mean(tensors: list[torch.Tensor], world_size: int) -> None:
    """Sum ``tensors`` over processes and divide by ``world_size``, in place: flattened into buckets of
    at most BUCKET_BYTES per (device, dtype), all launched before waiting on any."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    pending = []
    for members in groups.values():
        for bucket in _buckets(members):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            pending.append((flat, bucket, dist.all_reduce(flat, async_op=True)))
    for flat, bucket, work in pending:
        work.wait()
        flat.div_(world_size)
        for tensor, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            tensor.copy_(part.view_as(tensor))


def _buckets(tensors: list[torch.Tensor]):
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


def setup(device_name: str) -> tuple[Distributed, torch.device]:
    """This process's :class:`Distributed` and training device. Under torchrun (``WORLD_SIZE`` > 1),
    joins the process group unless the caller already did; each process takes GPU ``LOCAL_RANK``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), _device(device_name)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                f"start at most that many processes per node (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)  # one GPU per process, whatever --device said
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except (RuntimeError, ValueError) as error:
            raise ValueError(
                f"cannot join the process group (RANK={rank}, WORLD_SIZE={world_size}): {error}. "
                f"Start multi-process training with torchrun, which sets MASTER_ADDR and "
                f"MASTER_PORT"
            ) from error
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device, owns), device


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:<index>") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name} asks for a GPU but torch sees none (torch.cuda.is_available() is False); use --device cpu"
        )
    return device

"""Cost of each sub-network: active parameters, MACs and latency.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (which counts FLOPs = 2 x MACs for
matmuls and convolutions) and are reported as multiply-accumulates, the unit the paper calls
"FLOPs". Like torchvision's published GFLOPS, they count convolutions, linear layers and matmuls,
not norms, activations or additions. :func:`count_macs_by_hooks` is an independent count from layer
shapes that the tests use to validate the flop counter.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..core.skip import SkipConfig


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# Attention kernels the flop counter has no formula for (it would silently count them as zero).
_MISSING_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``example`` (whole batch).

    Two blind spots of ``FlopCounterMode`` are closed here: ``nn.MultiheadAttention``'s inference fast
    path runs one fused native op the counter cannot see into (it is disabled while counting, which
    routes attention through linear layers and scaled-dot-product attention), and the CPU
    flash-attention kernel has no registered formula (one is supplied). Checked against torchvision's
    published GFLOPS in the tests."""
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_MISSING_FORMULAS) as counter:
            model(example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_macs_by_hooks(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of convolutions and linear layers computed from their shapes (an independent check)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output):
        nonlocal total
        per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * per_output

    def linear_hook(module: nn.Linear, _inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def _time_once(run, inputs, cuda: bool) -> float:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    run(inputs)
    sync()
    return (time.perf_counter() - start) * 1e3


def _summarize(times: list[float], example: torch.Tensor, backend: str = "eager") -> dict:
    times = sorted(times)
    return {
        "latency_ms": statistics.median(times),
        "latency_p10_ms": times[int(0.1 * (len(times) - 1))],
        "latency_p90_ms": times[int(round(0.9 * (len(times) - 1)))],
        "batch_size": example.shape[0],
        "threads": torch.get_num_threads(),
        "device": str(example.device),
        "backend": backend,
        "repeats": len(times),
    }


def time_interleaved(runners, inputs, warmup: int = 3, repeats: int = 10, cuda: bool = False) -> list[list[float]]:
    """Wall times (ms) of each runner, taken in rounds (one call of every runner per round), so that
    drift in machine load affects every runner alike and ratios between them stay meaningful on a
    shared machine."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    times: list[list[float]] = [[] for _ in runners]
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for index, run in enumerate(runners):
                elapsed = _time_once(run, inputs, cuda)
                if round_index >= warmup:
                    times[index].append(elapsed)
    return times


def measure_latency(model: nn.Module, example: torch.Tensor, warmup: int = 3, repeats: int = 10) -> dict:
    """Median and spread of forward-pass wall time in milliseconds (CUDA is synchronised)."""
    was_training = model.training
    model.eval()
    try:
        return _summarize(time_interleaved([model], example, warmup, repeats, example.is_cuda)[0], example)
    finally:
        model.train(was_training)


def measure_depth_latencies(
    net: nn.Module, example: torch.Tensor, configs, warmup: int = 3, repeats: int = 10, backend: str = "eager"
) -> list[dict]:
    """Latency of ``net`` at each depth in ``configs`` on ``backend`` (eager: the adaptive network
    itself, switching depth; compile / onnxruntime: each sub-network prepared ahead, see
    :mod:`adn.backends`), timed in interleaved rounds."""
    from .backends import depth_runners

    was_training = net.training
    net.eval()
    try:
        runners, inputs = depth_runners(net, example, configs, backend)
        times = time_interleaved(runners, inputs, warmup, repeats, example.is_cuda)
    finally:
        net.train(was_training)
    return [_summarize(t, example, backend) for t in times]


def profile_subnetworks(
    net: nn.Module,
    example: torch.Tensor,
    skips=None,
    latency: bool = True,
    warmup: int = 3,
    repeats: int = 10,
    backend: str = "eager",
) -> list[dict]:
    """One row per sub-network: ``skip``, ``params`` (active), ``macs`` (per image) and, when
    ``latency``, ``latency_ms`` with its spread, batch size, threads, device and backend. In eager
    mode the latency is that of the adaptive network itself at each depth (what users run) and
    ``switch_us`` the time to change depth."""
    configs = SkipConfig.all(net.num_stages) if skips is None else [SkipConfig(s, net.num_stages) for s in skips]
    rows = []
    for config in configs:
        sub = net.subnet(config)
        rows.append(
            {
                "skip": str(config),
                "params": sum(p.numel() for p in sub.parameters()),
                "macs": count_macs(sub, example[:1]),
            }
        )
    if latency:
        for row, timing in zip(rows, measure_depth_latencies(net, example, configs, warmup, repeats, backend)):
            row.update(timing)
        if backend == "eager":
            for row, config in zip(rows, configs):
                row["switch_us"] = measure_switch(net, config)
    return rows


def measure_switch(net: nn.Module, config, repeats: int = 50) -> float:
    """Median time in microseconds to switch ``net`` from the super-net to ``config`` (flag writes only:
    no weights are copied and nothing is rebuilt)."""
    super_net = SkipConfig.super_net(net.num_stages)
    config = SkipConfig(config, net.num_stages)
    previous = net.skip
    times = []
    try:
        for _ in range(repeats):
            net.skip = super_net
            start = time.perf_counter()
            net.skip = config
            times.append((time.perf_counter() - start) * 1e6)
    finally:
        net.skip = previous
    return statistics.median(times)

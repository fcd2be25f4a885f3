"""``--amp``: mixed-precision training. Forward passes and losses run under ``torch.autocast``;
float16 (the CUDA default, as in torchvision's ``--amp``) also needs a GradScaler so that small
gradients do not underflow; bfloat16 (the CPU default) has float32's range and needs none.

:func:`native_bfloat16` tells whether the hardware computes bfloat16 natively (CPUs with AVX512-BF16
or AMX, GPUs from Ampere on): there ``adn train`` turns mixed precision on by default, since bfloat16
autocast trained an individual ResNet-20 to the same held-out accuracy as float32 in a seeded comparison
(92.92 vs 93.06%, docs/reproduction.md) and, with channels-last, ran training steps 1.66-1.70x faster on
a 2-core AVX512-BF16 EPYC (benchmarks/training_speed.py, batch 128, 1 thread)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

AMP_DTYPES = ("auto", "float16", "bfloat16")


class Precision:
    """How a training step computes: ``autocast()`` around forward passes and losses, ``backward(loss)``
    for every backward pass, ``step(optimizer)`` for the update (``unscale(optimizer)`` first to clip
    gradients in their true scale)."""

    def __init__(self, device: torch.device | str = "cpu", amp: bool = False, dtype: str = "auto"):
        if dtype not in AMP_DTYPES:
            raise ValueError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {dtype!r}")
        self.device_type = torch.device(device).type
        self.enabled = amp
        if dtype == "auto":
            dtype = "float16" if self.device_type == "cuda" else "bfloat16"
        self.dtype = getattr(torch, dtype)
        self.scaler = torch.amp.GradScaler(self.device_type) if amp and self.dtype == torch.float16 else None

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:  # skips the update when a gradient overflowed, and adapts the scale
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def __repr__(self) -> str:
        if not self.enabled:
            return "float32"
        return f"{str(self.dtype).removeprefix('torch.')} autocast" + (" + GradScaler" if self.scaler else "")


FLOAT32 = Precision()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no automatic bfloat16 on CPU
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (not emulated through float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False

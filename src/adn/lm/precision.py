"""The dtype a language model's weights are kept in while it decodes or is evaluated.

Decoding one token at a time (batch 1) on a CPU is bound by reading the weights from memory: every step
reads every weight of the depth that runs. bfloat16 weights halve what is read, but only pay where the CPU
computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere every bfloat16 matrix product is converted to
float32 on the fly and decoding gets slower. So ``"auto"`` is bfloat16 where
:func:`adn.training.precision.native_bfloat16` says the CPU has it, float32 elsewhere.

Only parameters are cast: floating-point buffers (the rotary embedding's inverse frequencies) stay float32,
as ``from_pretrained(dtype=torch.bfloat16)`` keeps them; casting them would shift every position's angle.
"""

from __future__ import annotations

import torch

from ..training.precision import native_bfloat16
from .matvec import use_matvec_for_single_tokens

DTYPE_CHOICES = ("auto", "float32", "bfloat16")


def decoding_dtype(choice: str = "auto", device: str = "cpu") -> torch.dtype:
    """``torch.float32`` or ``torch.bfloat16`` for ``choice`` (one of :data:`DTYPE_CHOICES`)."""
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return getattr(torch, choice)


def cast_weights(net: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``net`` with its floating-point parameters in ``dtype`` and its floating-point buffers as they were
    (module docstring). With bfloat16, single-token steps also go through a matrix-vector product
    (:mod:`adn.lm.matvec`: the fast bfloat16 kernel for one row). In place; returns ``net``."""
    buffers = {name: b for name, b in net.named_buffers() if b.is_floating_point()}
    net.to(dtype)
    for name, buffer in buffers.items():
        owner, _, leaf = name.rpartition(".")
        module = net.get_submodule(owner) if owner else net
        module._buffers[leaf] = buffer  # noqa: SLF001  (torch's own registry: no public setter keeps the dtype)
    if dtype == torch.bfloat16:
        use_matvec_for_single_tokens(net)
    return net


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

"""The kernels that multiply decoding steps by weight matrices: whichever reads bfloat16 weights fastest.

Batch-1 decoding multiplies every weight matrix by one vector per step. On a CPU with native bfloat16,
``torch.nn.functional.linear`` on a single bfloat16 row goes through a matrix-matrix kernel that reaches
about 40% of the memory bandwidth (slower than float32 for SmolLM2's small projections), while
``torch.mv`` on the same weights reads them at close to the bandwidth (measured in
benchmarks/lm_decode.py, docs/language-models.md). So a decoding step of one token uses ``torch.mv``;
anything with more rows (a prompt, a speculative verification of several tokens) keeps the usual kernel.

Faster still, where PyTorch is built with oneDNN (its x86 builds are): a bfloat16 weight *packed* once into
oneDNN's blocked layout (:class:`Projection`, what the decoding engine uses). Unpacked, every bfloat16
``linear`` call re-lays the weight out before multiplying. Measured on an AMD EPYC (Zen 4, AVX512-BF16) with
one thread, SmolLM2's projections: packed 10-14 GB/s for one row, 11-17 GB/s for three, against 5-9 GB/s
for ``linear`` and 4-8 GB/s for ``torch.mv`` (float32 ``linear``: 11-15 GB/s); results bit-identical to
``linear``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def uses_matvec(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` is one bfloat16 row on the CPU: the case ``torch.mv`` computes faster."""
    return x.numel() == x.shape[-1] and x.device.type == "cpu" and weight.dtype == torch.bfloat16


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``torch.mv`` where :func:`uses_matvec` says it is faster.
    Both kernels accumulate in float32; the bias inside the product (addmv) is rounded once, as the linear
    kernel rounds it."""
    if not uses_matvec(x, weight):
        return F.linear(x, weight, bias)
    vector = x.reshape(-1).to(weight.dtype)
    y = torch.mv(weight, vector) if bias is None else torch.addmv(bias, weight, vector)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _pack_ops():
    """oneDNN's weight packing and packed linear (the ops torch.compile's CPU backend uses), or None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise  # noqa: SLF001
    except (AttributeError, RuntimeError):
        return None


def can_pack(weight: torch.Tensor) -> bool:
    """Whether :class:`Projection` packs ``weight``: bfloat16 on the CPU, with oneDNN's ops available."""
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and _pack_ops() is not None


class Projection:
    """``x @ weight.T + bias`` by the fastest kernel for decoding: a oneDNN-packed bfloat16 weight where
    :func:`can_pack` (any number of rows), else :func:`project`. ``pack=False`` keeps :func:`project`."""

    __slots__ = ("weight", "bias", "packed", "_linear")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        self.bias = bias
        self.packed = self._linear = None
        if pack and can_pack(weight):
            reorder, self._linear = _pack_ops()  # looked up once: __call__ is on every decoding step's path
            self.packed = reorder(weight.contiguous(), 1)  # laid out for one row; works for any number
            self.weight = None  # the packed copy holds the values: no second copy kept
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return project(x, self.weight, self.bias)
        return self._linear(x.to(torch.bfloat16), self.packed, self.bias, "none", [], "")


class MatVecLinear(nn.Linear):
    """An ``nn.Linear`` whose forward on a single row of bfloat16 on the CPU is a matrix-vector product.
    Same parameters, same state dict; only the kernel differs (both accumulate in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias)


def use_matvec_for_single_tokens(net: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``net`` into a :class:`MatVecLinear` (in place; the parameters,
    hooks and tied weights stay as they are). Returns how many were changed."""
    changed = 0
    for module in net.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatVecLinear
            changed += 1
    return changed

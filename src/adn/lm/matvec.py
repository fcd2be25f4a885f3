"""Single-token decoding steps through a matrix-vector product where it reads bfloat16 weights faster.

Batch-1 decoding multiplies every weight matrix by one vector per step. On a CPU with native bfloat16,
``torch.nn.functional.linear`` on a single bfloat16 row goes through a matrix-matrix kernel that reaches
about 40% of the memory bandwidth (slower than float32 for SmolLM2's small projections), while
``torch.mv`` on the same weights reads them at close to the bandwidth (measured in
benchmarks/lm_decode.py, docs/language-models.md). So a decoding step of one token uses ``torch.mv``;
anything with more rows (a prompt, a speculative verification of several tokens) keeps the usual kernel.
"""

from __future__ import annotations

import torch
from torch import nn


class MatVecLinear(nn.Linear):
    """An ``nn.Linear`` whose forward on a single row of bfloat16 on the CPU is a matrix-vector product.
    Same parameters, same state dict; only the kernel differs (both accumulate in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or x.device.type != "cpu" or self.weight.dtype != torch.bfloat16:
            return super().forward(x)
        vector = x.reshape(-1).to(self.weight.dtype)
        # the bias inside the product (addmv) is rounded once, as nn.Linear's kernel rounds it
        y = torch.mv(self.weight, vector) if self.bias is None else torch.addmv(self.bias, self.weight, vector)
        return y.reshape(*x.shape[:-1], self.out_features)


def use_matvec_for_single_tokens(net: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``net`` into a :class:`MatVecLinear` (in place; the parameters,
    hooks and tied weights stay as they are). Returns how many were changed."""
    changed = 0
    for module in net.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatVecLinear
            changed += 1
    return changed

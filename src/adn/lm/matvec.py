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


# Most rows :meth:`Projection.rows_alone` is probed for: a speculative verification's tokens.
MOST_ROWS = 16

# (kernel, out features, in features, bias, threads) -> row counts whose products give one-row results.
_ONE_ROW_COUNTS: dict[tuple, tuple[int, ...]] = {}


class Projection:
    """``x @ weight.T + bias`` by the fastest kernel for decoding: a oneDNN-packed bfloat16 weight where
    :func:`can_pack` (any number of rows), else :func:`project`. ``pack=False`` keeps :func:`project`.

    :meth:`rows_alone` multiplies a few rows so that each comes out bit-identical to a product of that row
    alone (what a decoding step computes), in one product where the kernel allows it."""

    __slots__ = ("weight", "bias", "packed", "_linear", "shape", "_counts")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        self.bias = bias
        self.packed = self._linear = None
        self.shape = tuple(weight.shape)
        self._counts: tuple[int, tuple[int, ...]] | None = None  # (threads, counts giving one-row results)
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

    def rows_alone(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` for ``x`` of [rows, features] (rows <= :data:`MOST_ROWS`), every row bit-identical to
        ``self`` of that row alone.

        A product kernel picks its blocking by the number of rows, and another blocking can sum in another
        order: on an AMD EPYC (Zen 4), oneDNN's packed bfloat16 products of SmolLM2's 576-wide projections and
        head give one-row results for any count up to 16, but its down projection (576 x 1536) for none (2 to
        16 rows agree with each other, not with one), and MKL's float32 products for none. So the rows take one
        product, padded with zeros to the nearest count that gives one-row results (:meth:`one_row_counts`),
        or, with none, one product each (the matrix then comes from the cache after the first)."""
        count = x.shape[0]
        if count == 1:
            return self(x)
        fit = next((m for m in self.one_row_counts() if m >= count), None)
        if fit is None:
            return torch.cat([self(x[i : i + 1]) for i in range(count)])
        if fit == count:
            return self(x)
        return self(F.pad(x, (0, 0, 0, fit - count)))[:count]

    def one_row_counts(self) -> tuple[int, ...]:
        """The row counts (2 .. :data:`MOST_ROWS`, ascending) whose products give every row what a product of
        that row alone gives, wherever it sits and whatever the other rows hold, for this kernel, shape and the
        current thread count. Probed once on crafted rows (:func:`_probe_rows`)."""
        threads = torch.get_num_threads()
        if self._counts is None or self._counts[0] != threads:
            kind = "packed" if self.packed is not None else str(self.weight.dtype)
            key = (kind, *self.shape, self.bias is not None, threads)
            if key not in _ONE_ROW_COUNTS:
                _ONE_ROW_COUNTS[key] = _probe_rows(self)
            self._counts = (threads, _ONE_ROW_COUNTS[key])
        return self._counts[1]


def _probe_rows(projection: Projection) -> tuple[int, ...]:
    """:meth:`Projection.one_row_counts`, measured on a projection of the same kernel and shape whose weights
    are all one, fed rows built to show any change in the order of summation: each holds ``+2**20`` and
    ``-2**20`` at random places among values in (-1, 1), so which small values are rounded away depends on where
    the large ones fall in the order, and the exact sum (small) shows it even in bfloat16. (A changed order
    seldom shows in random rows' bfloat16 results: their rounding hides it.)"""
    dtype = torch.bfloat16 if projection.packed is not None else projection.weight.dtype
    source = projection.packed if projection.packed is not None else projection.weight
    ones = torch.ones(projection.shape, dtype=dtype, device=source.device)
    bias = None if projection.bias is None else torch.zeros_like(projection.bias)
    probe = Projection(ones, bias, pack=projection.packed is not None)
    generator = torch.Generator().manual_seed(0)
    features = projection.shape[1]
    counts = set(range(2, MOST_ROWS + 1))
    for _ in range(2):
        x = torch.rand(MOST_ROWS, features, generator=generator) * 2 - 1
        for row in x:
            large = torch.randperm(features, generator=generator)[:2]
            row[large[0]], row[large[1]] = 2.0**20, -(2.0**20)
        x = x.to(device=source.device, dtype=dtype)
        alone = torch.cat([probe(x[i : i + 1]) for i in range(MOST_ROWS)])
        for m in list(counts):
            among_zeros = F.pad(x[:1], (0, 0, 0, m - 1))  # the first row, then zeros
            same = torch.equal(probe(x[:m]), alone[:m])
            if not (same and torch.equal(probe(among_zeros)[0], alone[0])):
                counts.discard(m)
    return tuple(sorted(counts))


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

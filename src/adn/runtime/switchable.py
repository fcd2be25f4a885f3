"""One exported program for every depth: the depth is an input, not a choice made at export time.

``adn export --format onnx`` writes one file per depth: 2^N copies of the shared weights, 2^N sessions to
keep loaded. :func:`export_switchable_onnx` writes one ONNX file whose inputs are ``images`` (dynamic batch)
and ``skip``, a bool tensor of shape ``[N]`` (one flag per stage, True: that stage's skippable part is not
executed), and whose output is ``logits``. Every weight is stored once; each skip-aware norm and its twin
are both stored (they are different parameters), and so are the per-depth statistics tables of a network
that has them.

How: :class:`SwitchableNetwork` runs the network with each stage's flag taken from the ``skip`` tensor. The
skip machinery (:mod:`adn.layers`) sees tensor flags and chooses with ``torch.cond``, which the exporter
turns into ONNX ``If``: a skipped block is not executed, as in a per-depth file. A network with per-depth
batch-norm statistics reads the row of its depth with a gather indexed by the flags (row = sum of flag_i
* 2^i, :attr:`adn.SkipConfig.index`).

Every depth is run in ONNX Runtime before the file is kept, at batch sizes 1 and 3, and compared with the
adaptive network in PyTorch (:data:`adn.runtime.graph_export.ONNX_TOLERANCE`, as for per-depth files).
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.depth_statistics import rows_apply
from ..core.layers import ACTIVE_DEPTH, STATISTICS_ROW
from ..core.network import AdaptiveDepthNetwork
from ..core.skip import SkipConfig
from ..utils.atomic import atomic_write
from .graph_export import ONNX_TOLERANCE

INPUT_NAMES = ["images", "skip"]
OUTPUT_NAMES = ["logits"]


class SwitchableNetwork(nn.Module):
    """``forward(images, skip)``: the adaptive network ``net`` at the depth given by the bool tensor ``skip``
    (shape ``[N]``). Meant to be traced (``torch.export``, ONNX); in eager mode ``net(images, skip=...)`` is
    the faster way to run a depth (plain Python flags, no conditionals)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if not isinstance(net, AdaptiveDepthNetwork):
            raise TypeError(f"expected a network converted with adn.convert, got {type(net).__name__}")
        self.net = net
        # Decided here, not in forward: rows_apply compares the weights' version counters with those the
        # rows were measured at, and the tensors that tracing substitutes for the weights have counters of
        # their own (it would mark the rows stale for good).
        self.per_depth_statistics = not net.training and rows_apply(net)
        # Row of the per-depth statistics = sum of flag_i * 2^i (SkipConfig.index).
        self.register_buffer("row_weights", torch.tensor([1 << i for i in range(net.num_stages)]), persistent=False)

    def forward(self, images: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        net = self.net
        active = {}
        for index, stage in enumerate(net.adn_stages):
            flag = skip[index]
            active.update({module: flag for module in stage.skippable + stage.norms + stage.idle})
        row = (skip.to(self.row_weights.dtype) * self.row_weights).sum() if self.per_depth_statistics else None
        depth_token = ACTIVE_DEPTH.set(active)
        row_token = STATISTICS_ROW.set(row)
        try:
            # The original model's forward, past AdaptiveDepthNetwork.forward: that one would set the
            # statistics row from the default depth (Python flags), not from ``skip``.
            return super(AdaptiveDepthNetwork, net).forward(images)
        finally:
            STATISTICS_ROW.reset(row_token)
            ACTIVE_DEPTH.reset(depth_token)


def _traced_example(example: torch.Tensor) -> torch.Tensor:
    # torch.export specializes a size of 1; trace at 2 to keep the batch dynamic.
    return example.expand(2, *example.shape[1:]).contiguous() if example.shape[0] == 1 else example


def export_switchable_program(net: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of :class:`SwitchableNetwork` (dynamic batch), inputs ``(images, skip)``."""
    switchable = SwitchableNetwork(net).eval()
    skip = torch.zeros(net.num_stages, dtype=torch.bool)
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(switchable, (_traced_example(example), skip), dynamic_shapes=({0: batch}, None))


def write_switchable_onnx(net: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> None:
    """Export ``net`` (in eval mode) as a switchable ONNX file at ``path``, unverified: see
    :func:`export_switchable_onnx`."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as error:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install 'adn[onnx]'") from error
    switchable = SwitchableNetwork(net).eval()
    skip = torch.zeros(net.num_stages, dtype=torch.bool)
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress; keep stdout for results
        # external_data=False: the weights inside the file, so that the file alone is the model.
        torch.onnx.export(switchable, (_traced_example(example), skip), str(path), dynamo=True,
                          dynamic_shapes=({0: batch}, None), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                          verbose=False, external_data=False)


def export_switchable_onnx(net: nn.Module, example: torch.Tensor, path: str | os.PathLike,
                           tolerance: float = ONNX_TOLERANCE) -> dict:
    """Write one ONNX file at ``path`` that runs ``net`` at every depth (inputs ``images``, ``skip``), verify
    every depth in ONNX Runtime (if installed) before it is kept, and return what was written: ``file``,
    ``bytes``, ``num_stages``, ``depths``, ``tolerance`` and the largest difference from PyTorch,
    ``max_difference`` (None without ONNX Runtime). The network is exported in eval mode and left in the mode
    it was in."""
    path = Path(path)
    was_training = net.training
    net.eval()
    report: dict = {}

    def write(tmp: str) -> None:
        write_switchable_onnx(net, example, tmp)
        report["max_difference"] = verify_switchable_onnx(tmp, net, example, tolerance)

    try:
        atomic_write(path, write, suffix=".onnx")
    finally:
        net.train(was_training)
    return {"file": str(path), "bytes": path.stat().st_size, "num_stages": net.num_stages,
            "depths": 2 ** net.num_stages, "tolerance": tolerance, **report}


def verify_switchable_onnx(path, net: nn.Module, example: torch.Tensor, tolerance: float = ONNX_TOLERANCE,
                           batch_sizes=(1, 3)) -> float | None:
    """Run the switchable ONNX file at every depth and each batch size on random images and compare with
    ``net(images, skip=depth)``; raise if any depth differs by more than ``tolerance`` or gives a NaN or
    infinite value. Returns the largest difference, or None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # not its notes on initializers the exporter left unused
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in batch_sizes:
        images = torch.randn(batch, *example.shape[1:], generator=generator)
        for config in SkipConfig.all(net.num_stages):
            with torch.no_grad():
                expected = net(images, skip=config).numpy()
            got = session.run(None, {"images": images.numpy(), "skip": np.array(config, dtype=bool)})[0]
            where = f"depth {config}, batch {batch} of random images"
            # Checked first: a NaN makes every comparison false, so all-NaN outputs would pass the one below.
            if not np.isfinite(expected).all():
                raise ValueError(f"the PyTorch network gives NaN or infinite outputs ({where}); not writing {path}. "
                                 "Its weights are broken: check the checkpoint (did training diverge?)")
            if not np.isfinite(got).all():
                raise ValueError(f"ONNX Runtime gives NaN or infinite outputs for {path} ({where}) where PyTorch's "
                                 "are finite; not writing it")
            if got.shape != expected.shape:
                raise ValueError(f"ONNX Runtime output has shape {got.shape}, PyTorch's {expected.shape} ({where}); "
                                 f"not writing {path}")
            difference = float(np.abs(got - expected).max())
            if difference > tolerance:
                raise ValueError(f"ONNX Runtime output differs from PyTorch by {difference:.2e} (> {tolerance}) "
                                 f"at {where}; not writing {path}")
            worst = max(worst, difference)
    return worst

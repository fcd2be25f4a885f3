"""One sub-network -> a file that runs without adn: an ONNX model (verified in ONNX Runtime against PyTorch)
or a ``torch.export`` program, both with a dynamic batch dimension. :mod:`adn.deploy.export` writes export
folders from these; :mod:`adn.runtime.backends` loads the ONNX files into ONNX Runtime sessions."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch

# Largest accepted difference from PyTorch, for outputs of magnitude up to 1; larger outputs are compared
# relative to their largest magnitude (float32 rounding grows with the values: a randomly initialised
# ResNet-50's logits of ~10 differ by ~6e-4 between engines).
ONNX_TOLERANCE = 1e-4


def export_onnx(sub: torch.nn.Module, example: torch.Tensor, path: str, data_name: str | None = None) -> str | None:
    """Export ``sub`` to ONNX at ``path`` and verify it. The weights go inside the file, so that the file
    alone is the model. Models over torch's limit for that (1.5 GB of weights; protobuf cannot exceed 2 GB)
    get one external data file, renamed to ``data_name`` (default ``<path name>.data``) next to ``path``.
    Returns the data file's name, or None when the file is self-contained."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as error:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install 'adn[onnx]'") from error
    batch = torch.export.Dim("batch", min=1)
    if example.shape[0] == 1:  # torch.export specializes a size of 1; trace at 2 to keep the batch dynamic
        example = example.expand(2, *example.shape[1:]).contiguous()
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress; keep stdout for results
        # external_data=False: torch's default writes the weights to "<path>.data", named after what is a
        # temporary file when exporting, so a copied or renamed .onnx file lost its weights.
        torch.onnx.export(
            sub,
            (example,),
            path,
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=["images"],
            output_names=["logits"],
            verbose=False,
            external_data=False,
        )
    exporter_data = Path(f"{path}.data")  # written by torch only for models over its limit
    data = None
    try:
        if exporter_data.exists():
            data = data_name or exporter_data.name
            if data != exporter_data.name:
                _rename_external_data(Path(path), exporter_data, data)
        verify_onnx(path, sub, example)
    except BaseException:
        for leftover in {exporter_data, Path(path).with_name(data or exporter_data.name)}:
            leftover.unlink(missing_ok=True)
        raise
    return data


def export_pt2(sub: torch.nn.Module, example: torch.Tensor, name: str):
    """``torch.export`` program of ``sub`` with a dynamic batch dimension, and whether it is dynamic. A
    model whose code fixes the batch size cannot be exported so; it is exported at the example's batch
    size instead, with a warning (the manifest records ``dynamic_batch: false``)."""
    batch = torch.export.Dim("batch", min=1)
    traced = example.expand(2, *example.shape[1:]).contiguous() if example.shape[0] == 1 else example
    try:  # traced at batch 2: torch.export specializes a size of 1, which would fix the batch again
        return torch.export.export(sub, (traced,), dynamic_shapes=({0: batch},)), True
    except Exception as error:  # the exporter's constraint and tracing errors have no common base class
        print(
            f"adn: warning: {name}: the batch dimension cannot be made dynamic "
            f"({str(error).splitlines()[0][:200]}); exporting for batch size {example.shape[0]} only",
            file=sys.stderr,
        )
        return torch.export.export(sub, (example,)), False


def _rename_external_data(path: Path, data: Path, name: str) -> None:
    """Move the ONNX file ``path``'s external data file ``data`` to ``name`` in the same folder, and point
    the file's tensors at it (without loading the weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = name
    onnx.save(model, str(path))
    os.replace(data, path.with_name(name))


def verify_onnx(path, sub: torch.nn.Module, example: torch.Tensor, tolerance: float = ONNX_TOLERANCE) -> float | None:
    """Run the ONNX file in onnxruntime at two batch sizes and compare with PyTorch; raise if they differ,
    or if either gives a NaN or infinite value. Returns the largest difference, or None when onnxruntime
    is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 3):
        images = torch.randn(batch, *example.shape[1:])
        with torch.no_grad():
            expected = sub(images).numpy()
        got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
        worst = max(worst, compare(expected, got, tolerance, path, f"batch {batch} of random images", "ONNX Runtime"))
    return worst


def compare(expected: np.ndarray, got: np.ndarray, tolerance: float, path, where: str, engine: str) -> float:
    """The difference between ``got`` (from ``engine``) and PyTorch's ``expected``, relative to the outputs'
    scale (absolute for outputs up to 1); raise if either has a NaN or infinite value, the shapes differ, or
    the difference exceeds ``tolerance``."""
    # Checked first: a NaN makes every comparison false, so all-NaN outputs would pass the one below.
    if not np.isfinite(expected).all():
        raise ValueError(
            f"the PyTorch network gives NaN or infinite outputs ({where}); not writing {path}. "
            "Its weights are broken: check the checkpoint (did training diverge?)"
        )
    if not np.isfinite(got).all():
        raise ValueError(
            f"{engine} gives NaN or infinite outputs for {path} ({where}) where PyTorch's are finite; "
            "not writing it. An exporter or runtime problem: use another --format, and report the "
            "model with the torch and onnxruntime versions"
        )
    if got.shape != expected.shape:
        raise ValueError(
            f"{engine} output has shape {got.shape}, PyTorch's {expected.shape} ({where}); not writing {path}"
        )
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    difference = float(np.abs(got - expected).max(initial=0.0)) / scale
    if difference > tolerance:
        raise ValueError(
            f"{engine} output differs from PyTorch by {difference:.2e} of the outputs' scale "
            f"{scale:.3g} (> {tolerance}) at {where}; not writing {path}"
        )
    return difference

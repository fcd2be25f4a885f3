"""Export standalone sub-networks: one file per sub-network plus ``manifest.json``.

Formats: ``safetensors`` (weights of the plain sub-network, loadable into the same torchvision
architecture with its blocks removed), ``pt2`` (a ``torch.export`` program, runnable without adn) and
``onnx`` (dynamic batch dimension; when onnxruntime is installed every file is run in it and compared
with PyTorch before it is kept). Every file is written under a temporary name and renamed when complete
and verified."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_write
from .profile import count_macs
from .skip import SkipConfig

FORMATS = ("safetensors", "pt2", "onnx")
ONNX_TOLERANCE = 1e-4


def _export_onnx(sub: torch.nn.Module, example: torch.Tensor, path: str) -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as error:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install 'adn[onnx]'") from error
    batch = torch.export.Dim("batch", min=1)
    if example.shape[0] == 1:  # torch.export specializes a size of 1; trace at 2 to keep the batch dynamic
        example = example.expand(2, *example.shape[1:]).contiguous()
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress; keep stdout for results
        torch.onnx.export(sub, (example,), path, dynamo=True, dynamic_shapes=({0: batch},),
                          input_names=["images"], output_names=["logits"], verbose=False)
    verify_onnx(path, sub, example)


def verify_onnx(path, sub: torch.nn.Module, example: torch.Tensor, tolerance: float = ONNX_TOLERANCE) -> float | None:
    """Run the ONNX file in onnxruntime at two batch sizes and compare with PyTorch; raise if they differ.
    Returns the largest difference, or None when onnxruntime is not installed."""
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
        worst = max(worst, float(abs(got - expected).max()))
    if worst > tolerance:
        raise ValueError(f"ONNX Runtime output differs from PyTorch by {worst:.2e} (> {tolerance}); not writing {path}")
    return worst


def export_subnetworks(net, configs, output_dir, fmt: str, example: torch.Tensor, accuracy: dict | None = None) -> list[dict]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    configs = [SkipConfig(c, net.num_stages) for c in configs]  # validate every config before writing anything
    output = Path(output_dir)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create output directory {output}: {error.strerror or error}") from error
    if not os.access(output, os.W_OK):
        raise ValueError(f"output directory {output} is not writable; choose another --output")
    entries = []
    for config in configs:
        sub = net.subnet(config).eval()
        name = f"subnet_{config}.{fmt}"
        if fmt == "safetensors":
            tensors = {k: v.detach().contiguous().clone() for k, v in sub.state_dict().items()}
            atomic_write(output / name, lambda tmp: save_file(tensors, tmp, metadata={"skip": str(config)}))
        elif fmt == "pt2":
            program = torch.export.export(sub, (example,))
            atomic_write(output / name, lambda tmp: torch.export.save(program, tmp))
        else:
            atomic_write(output / name, lambda tmp: _export_onnx(sub, example, tmp))
        entry = {"skip": str(config), "file": name, "format": fmt,
                 "params": sum(p.numel() for p in sub.parameters()), "macs": count_macs(sub, example[:1])}
        if accuracy and str(config) in accuracy:
            entry.update(accuracy[str(config)])
        entries.append(entry)
    manifest = {"input_shape": list(example.shape[1:]), "subnetworks": entries}
    atomic_write(output / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return entries

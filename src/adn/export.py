"""Export standalone sub-networks: one file per sub-network plus ``manifest.json``.

Formats: ``safetensors`` (weights of the plain sub-network, loadable into the same torchvision
architecture with its blocks removed), ``pt2`` (a ``torch.export`` program with a dynamic batch
dimension, runnable without adn) and
``onnx`` (dynamic batch dimension, weights inside the file; when onnxruntime is installed every file is
run in it and compared with PyTorch before it is kept, and loaded again under its final name). Every file
is written under a temporary name and renamed when complete and verified. Exporting into a folder that
holds an earlier export replaces it: the earlier manifest's files that the new one does not list are
deleted, so the folder holds exactly what its manifest describes."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from . import jsonout
from .atomic import atomic_write
from .depth_statistics import statistics_in_use
from .labels import class_names
from .preprocess import Preprocessing
from .profile import count_macs
from .skip import SkipConfig

FORMATS = ("safetensors", "pt2", "onnx")
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
        torch.onnx.export(sub, (example,), path, dynamo=True, dynamic_shapes=({0: batch},),
                          input_names=["images"], output_names=["logits"], verbose=False, external_data=False)
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


def _export_pt2(sub: torch.nn.Module, example: torch.Tensor, name: str):
    """``torch.export`` program of ``sub`` with a dynamic batch dimension, and whether it is dynamic. A
    model whose code fixes the batch size cannot be exported so; it is exported at the example's batch
    size instead, with a warning (the manifest records ``dynamic_batch: false``)."""
    batch = torch.export.Dim("batch", min=1)
    traced = example.expand(2, *example.shape[1:]).contiguous() if example.shape[0] == 1 else example
    try:  # traced at batch 2: torch.export specializes a size of 1, which would fix the batch again
        return torch.export.export(sub, (traced,), dynamic_shapes=({0: batch},)), True
    except Exception as error:  # the exporter's constraint and tracing errors have no common base class
        print(f"adn: warning: {name}: the batch dimension cannot be made dynamic "
              f"({str(error).splitlines()[0][:200]}); exporting for batch size {example.shape[0]} only",
              file=sys.stderr)
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
        # Checked first: a NaN makes every comparison false, and max(0.0, nan) is 0.0, so a model whose
        # outputs are all NaN would pass the comparison below.
        if not np.isfinite(expected).all():
            raise ValueError(f"the PyTorch sub-network gives NaN or infinite outputs (batch {batch} of random images); "
                             f"not writing {path}. Its weights are broken: check the checkpoint (did training diverge?)")
        if not np.isfinite(got).all():
            raise ValueError(f"ONNX Runtime gives NaN or infinite outputs for {path} (batch {batch} of random images) "
                             "where PyTorch's are finite; not writing it. An exporter or runtime problem: use "
                             "--format pt2 or safetensors, and report the model with the torch and onnxruntime versions")
        if got.shape != expected.shape:
            raise ValueError(f"ONNX Runtime output has shape {got.shape}, PyTorch's {expected.shape}; not writing {path}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > tolerance:
        raise ValueError(f"ONNX Runtime output differs from PyTorch by {worst:.2e} (> {tolerance}); not writing {path}")
    return worst


def export_subnetworks(net, configs, output_dir, fmt: str, example: torch.Tensor, accuracy: dict | None = None,
                       meta: dict | None = None) -> list[dict]:
    """Write each sub-network in ``configs`` and ``manifest.json``. With the checkpoint's ``meta``, the
    manifest also says what the files take and give: ``preprocess`` and ``class_names``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    configs = [SkipConfig(c, net.num_stages) for c in configs]  # validate every config before writing anything
    model_io = {}
    if meta is not None:  # read (and checked) before anything is written
        model_io = {"preprocess": Preprocessing.from_meta(meta).to_dict(), "class_names": class_names(meta)}
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
            program, dynamic = _export_pt2(sub, example, name)
            atomic_write(output / name, lambda tmp: torch.export.save(program, tmp))
        else:
            data_files = []  # what export_onnx returns inside atomic_write: None, or the external data file
            atomic_write(output / name, lambda tmp: data_files.append(export_onnx(sub, example, tmp, f"{name}.data")))
            # Once more as it will be used: under its final name, loaded by ONNX Runtime from there.
            try:
                verify_onnx(output / name, sub, example)
            except Exception as error:
                (output / name).unlink(missing_ok=True)
                raise ValueError(f"{output / name} fails in ONNX Runtime under its final name, so it was removed: "
                                 f"{str(error).splitlines()[0][:300]}") from error
        entry = {"skip": str(config), "file": name, "format": fmt,
                 "params": sum(p.numel() for p in sub.parameters()), "macs": count_macs(sub, example[:1])}
        if fmt == "pt2":
            entry["dynamic_batch"] = dynamic  # false: the program runs at the input_shape's batch size only
            if not dynamic:
                entry["batch_size"] = example.shape[0]
        if fmt == "onnx" and data_files[0]:
            entry["data_file"] = data_files[0]  # weights over torch's one-file limit: copy it with the .onnx
        if accuracy and str(config) in accuracy:
            entry.update(accuracy[str(config)])
        entries.append(entry)
    # Which batch-norm statistics the files carry: each depth's own (adn recalibrate) or the running ones.
    manifest = {"input_shape": list(example.shape[1:]), **model_io, "batch_norm_statistics": statistics_in_use(net),
                "subnetworks": entries}
    previous = _listed_files(output / "manifest.json")  # read before it is replaced
    atomic_write(output / "manifest.json", lambda tmp: Path(tmp).write_text(jsonout.dumps(manifest, indent=2)))
    _remove_stale(output, previous - {name for entry in entries for name in _entry_files(entry)})
    return entries


# What adn writes into an export folder; an earlier manifest is only trusted to name files of this form.
EXPORTED_FILE = re.compile(r"subnet_[TF]+\.(safetensors|pt2|onnx|onnx\.data)")


def _entry_files(entry) -> list[str]:
    """The file names a manifest entry lists (anything but a string is ignored: the entry may be edited)."""
    if not isinstance(entry, dict):
        return []
    return [entry[key] for key in ("file", "data_file") if isinstance(entry.get(key), str)]


def _listed_files(manifest: Path) -> set[str]:
    """The files an earlier export's manifest lists, as far as they are names adn writes (a manifest
    is a file anyone can edit: it must not make adn delete anything else); empty if there is none."""
    try:
        entries = json.loads(manifest.read_text()).get("subnetworks")
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(entries, list):
        return set()
    names = {name for entry in entries for name in _entry_files(entry)}
    return {name for name in names if EXPORTED_FILE.fullmatch(name)}


def _remove_stale(output: Path, names: set[str]) -> None:
    """Delete the files of an earlier export into ``output`` that the new manifest does not list, so
    that the folder holds exactly the export its manifest describes."""
    for name in sorted(names):
        try:
            (output / name).unlink()
        except FileNotFoundError:  # already gone: nothing to say
            continue
        except OSError as error:
            print(f"adn: warning: could not remove {output / name}, left from an earlier export and not in the "
                  f"new manifest ({error.strerror or error}); delete it by hand", file=sys.stderr)
            continue
        print(f"removed {output / name} (an earlier export's, not in the new manifest)", file=sys.stderr)

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

import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..utils import jsonout
from ..utils.atomic import atomic_write
from ..core.depth_statistics import statistics_in_use
from ..vision.labels import class_names
from ..vision.preprocess import Preprocessing
from ..runtime.graph_export import export_onnx, export_pt2, verify_onnx
from ..runtime.profile import count_macs
from ..core.skip import SkipConfig

FORMATS = ("safetensors", "pt2", "onnx")


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
            atomic_write(output / name, lambda tmp, tensors=tensors, config=config:
                         save_file(tensors, tmp, metadata={"skip": str(config)}))
        elif fmt == "pt2":
            program, dynamic = export_pt2(sub, example, name)
            atomic_write(output / name, lambda tmp, program=program: torch.export.save(program, tmp))
        else:
            data_files = []  # what export_onnx returns inside atomic_write: None, or the external data file
            atomic_write(output / name, lambda tmp, sub=sub, name=name, data_files=data_files:
                         data_files.append(export_onnx(sub, example, tmp, f"{name}.data")))
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

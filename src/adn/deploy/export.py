"""Export standalone sub-networks: one file per sub-network plus ``manifest.json``.

Formats: ``safetensors`` (weights of the plain sub-network, loadable into the same torchvision
architecture with its blocks removed), ``pt2`` (a ``torch.export`` program with a dynamic batch
dimension, runnable without adn) and
``onnx`` (dynamic batch dimension, weights inside the file; when onnxruntime is installed every file is
run in it and compared with PyTorch before it is kept, and loaded again under its final name). Every file
is written under a temporary name and renamed when complete and verified. Exporting into a folder that
holds an earlier export replaces it: the earlier manifest's files that the new one does not list are
deleted, so the folder holds exactly what its manifest describes. Anything else in the way is left alone
unless ``overwrite``: a ``manifest.json`` that is not an adn export's, or a file the export would write
that the earlier manifest does not list (:mod:`adn.utils.outputs`; checked before anything is written).

:func:`export_switchable` writes one file for every depth instead (``switchable.onnx`` or ``switchable.pt2``,
:mod:`adn.runtime.switchable`), verified at each depth before it is kept, and the same kind of manifest
with ``"switchable": true``, the file's inputs and outputs, and each verified depth's largest difference."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.depth_statistics import rows_apply, statistics_in_use
from ..core.skip import SkipConfig
from ..runtime.graph_export import export_onnx, export_pt2, verify_onnx
from ..runtime.profile import count_macs
from ..runtime.switchable import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    SwitchableExportError,
    export_switchable_onnx,
    export_switchable_pt2,
)
from ..utils import jsonout
from ..utils.atomic import atomic_write
from ..utils.outputs import OutputError, OutputKind, json_file, output_folder, output_path
from ..vision.labels import class_names
from ..vision.preprocess import Preprocessing

FORMATS = ("safetensors", "pt2", "onnx")
SWITCHABLE_FORMATS = ("onnx", "pt2")


def export_subnetworks(
    net,
    configs,
    output_dir,
    fmt: str,
    example: torch.Tensor,
    accuracy: dict | None = None,
    meta: dict | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Write each sub-network in ``configs`` and ``manifest.json``. With the checkpoint's ``meta``, the
    manifest also says what the files take and give: ``preprocess`` and ``class_names``. ``overwrite``:
    replace files in the way that no earlier adn export wrote (module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    configs = [SkipConfig(c, net.num_stages) for c in configs]  # validate every config before writing anything
    model_io = _model_io(meta)
    names = [f"subnet_{config}.{fmt}" for config in configs]
    output = _prepare(output_dir, names + [f"{name}.data" for name in names if fmt == "onnx"], overwrite)
    entries = []
    for config in configs:
        sub = net.subnet(config).eval()
        name = f"subnet_{config}.{fmt}"
        if fmt == "safetensors":
            tensors = {k: v.detach().contiguous().clone() for k, v in sub.state_dict().items()}
            atomic_write(
                output / name,
                lambda tmp, tensors=tensors, config=config: save_file(tensors, tmp, metadata={"skip": str(config)}),
            )
        elif fmt == "pt2":
            program, dynamic = export_pt2(sub, example, name)
            atomic_write(output / name, lambda tmp, program=program: torch.export.save(program, tmp))
        else:
            data_files = []  # what export_onnx returns inside atomic_write: None, or the external data file
            atomic_write(
                output / name,
                lambda tmp, sub=sub, name=name, data_files=data_files: data_files.append(
                    export_onnx(sub, example, tmp, f"{name}.data")
                ),
            )
            # Once more as it will be used: under its final name, loaded by ONNX Runtime from there.
            try:
                verify_onnx(output / name, sub, example)
            except Exception as error:
                (output / name).unlink(missing_ok=True)
                raise ValueError(
                    f"{output / name} fails in ONNX Runtime under its final name, so it was removed: "
                    f"{str(error).splitlines()[0][:300]}"
                ) from error
        entry = {
            "skip": str(config),
            "file": name,
            "format": fmt,
            "params": sum(p.numel() for p in sub.parameters()),
            "macs": count_macs(sub, example[:1]),
        }
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
    manifest = {
        "input_shape": list(example.shape[1:]),
        **model_io,
        "batch_norm_statistics": statistics_in_use(net),
        "subnetworks": entries,
    }
    _write_manifest(output, manifest)
    return entries


def export_switchable(
    net,
    configs,
    output_dir,
    fmt: str,
    example: torch.Tensor,
    accuracy: dict | None = None,
    meta: dict | None = None,
    depth_table: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write one file that runs every depth of ``net`` (``switchable.onnx``: inputs ``images`` and ``skip``; or
    ``switchable.pt2``: a ``torch.export`` program of both) and ``manifest.json``; return the manifest. The
    depths in ``configs`` are run from the file and compared with ``net`` before it is kept (ONNX: in ONNX
    Runtime, when installed); they are the manifest's ``subnetworks``, each with its ``max_difference``. A
    ``depth_table`` (``adn depth-table``'s JSON) goes into the manifest, for ``adn serve --model-dir``."""
    if fmt not in SWITCHABLE_FORMATS:
        raise ValueError(
            f"--switchable: one file for every depth is written as {' or '.join(SWITCHABLE_FORMATS)}, "
            f"not {fmt}; --format safetensors writes one file per depth (without --switchable)"
        )
    configs = [SkipConfig(c, net.num_stages) for c in configs]
    model_io = _model_io(meta)
    name = f"switchable.{fmt}"
    output = _prepare(output_dir, [name, f"{name}.data"], overwrite)
    entries = []  # measured before anything is written
    for config in configs:
        sub = net.subnet(config).eval()
        entry = {
            "skip": str(config),
            "file": name,
            "format": fmt,
            "skip_input": list(config),
            "params": sum(p.numel() for p in sub.parameters()),
            "macs": count_macs(sub, example[:1]),
        }
        if accuracy and str(config) in accuracy:
            entry.update(accuracy[str(config)])
        entries.append(entry)
    with torch.no_grad():
        classes = int(net(example[:1], skip=configs[0]).shape[1]) if configs else None
    write = export_switchable_onnx if fmt == "onnx" else export_switchable_pt2
    try:
        report = write(net.eval(), example[:1], output / name, configs=configs)
    except SwitchableExportError as error:
        other = "--format onnx --switchable (one ONNX file), or " if fmt == "pt2" else ""
        raise SwitchableExportError(
            f"{error}. Nothing was written; use {other}one file per depth (--format {fmt} without --switchable)"
        ) from error
    differences = report["differences"]
    for entry in entries:
        entry["max_difference"] = None if differences is None else differences[entry["skip"]]
    shape = list(example.shape[1:])
    manifest = {
        "switchable": True,
        "format": fmt,
        "file": name,
        "bytes": report["bytes"],
        "num_stages": net.num_stages,
        "opset": report.get("opset"),
        "input_shape": shape,
        "inputs": [
            {"name": INPUT_NAMES[0], "shape": ["batch", *shape], "dtype": "float32"},
            {
                "name": INPUT_NAMES[1],
                "shape": [net.num_stages],
                "dtype": "bool",
                "meaning": "one flag per stage, first stage first; true: that stage's skippable blocks are "
                "not run (the skip string's T)",
            },
        ],
        "outputs": [{"name": OUTPUT_NAMES[0], "shape": ["batch", classes], "dtype": "float32"}],
        **model_io,
        "batch_norm_statistics": statistics_in_use(net),
        "per_depth_statistics": rows_apply(net),
        "verification": {
            "engine": "onnxruntime" if fmt == "onnx" else "torch.export.load",
            "verified": differences is not None,
            "tolerance": report["tolerance"],
            "batch_sizes": [1, 3],
            "depths": len(configs),
            "max_difference": report["max_difference"],
        },
        "subnetworks": entries,
    }
    if depth_table is not None:
        manifest["depth_table"] = depth_table
    _write_manifest(output, manifest)
    return manifest


def _model_io(meta: dict | None) -> dict:
    """With the checkpoint's ``meta``: what the files take and give (read and checked before anything is written)."""
    if meta is None:
        return {}
    return {
        "model": meta.get("model"),
        "preprocess": Preprocessing.from_meta(meta).to_dict(),
        "class_names": class_names(meta),
    }


def is_manifest(data) -> bool:
    """Whether ``data`` (a manifest.json's JSON) is an adn export's manifest."""
    return isinstance(data, dict) and isinstance(data.get("subnetworks"), list)


MANIFEST = OutputKind("an adn export's manifest", "manifest.json", lambda path: json_file(path, is_manifest))


def check_export_folder(output_dir, overwrite: bool = False) -> Path:
    """Refuse an output folder adn must not export into (a file, not writable, or holding a
    ``manifest.json`` that no adn export wrote, unless ``overwrite``), before anything is loaded or written."""
    output = output_folder(output_dir)
    if output.is_dir():
        output_path(output / "manifest.json", MANIFEST, overwrite=overwrite, log=_say)
    return output


def _prepare(output_dir, names: list[str], overwrite: bool) -> Path:
    """The output folder, created, once the manifest and every file the export will write (``names``)
    are checked: each absent, listed by the earlier export's manifest, or (``overwrite``) a regular file."""
    output = check_export_folder(output_dir, overwrite)
    listed = _listed_files(output / "manifest.json")
    earlier = OutputKind(
        "a file of the earlier adn export in this folder (its manifest.json does not list it)",
        "export",
        lambda path: path.name in listed,
    )
    for name in names:
        output_path(output / name, earlier, overwrite=overwrite, log=_say)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create output directory {output}: {error.strerror or error}; choose another --output"
        ) from error
    return output


def _say(message: str) -> None:
    print(f"adn: {message}", file=sys.stderr)


def _write_manifest(output: Path, manifest: dict) -> None:
    """Write ``manifest.json``, then delete the files the earlier manifest listed and this one does not."""
    previous = _listed_files(output / "manifest.json")  # read before it is replaced
    atomic_write(output / "manifest.json", lambda tmp: Path(tmp).write_text(jsonout.dumps(manifest, indent=2)))
    _remove_stale(output, previous - {name for entry in manifest["subnetworks"] for name in _entry_files(entry)})


# What adn writes into an export folder; an earlier manifest is only trusted to name files of this form.
EXPORTED_FILE = re.compile(r"subnet_[TF]+\.(safetensors|pt2|onnx|onnx\.data)|switchable\.(onnx|pt2)")


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
            print(
                f"adn: warning: could not remove {output / name}, left from an earlier export and not in the "
                f"new manifest ({error.strerror or error}); delete it by hand",
                file=sys.stderr,
            )
            continue
        print(f"removed {output / name} (an earlier export's, not in the new manifest)", file=sys.stderr)

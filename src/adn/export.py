"""Export standalone sub-networks: one file per sub-network plus ``manifest.json``.

Formats: ``safetensors`` (weights of the plain sub-network, loadable into the same torchvision
architecture with its blocks removed) and ``pt2`` (a ``torch.export`` program, runnable without adn).
Every file is written under a temporary name and renamed when complete."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .profile import count_macs
from .skip import SkipConfig

FORMATS = ("safetensors", "pt2")


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


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
            _atomic(output / name, lambda tmp: save_file(tensors, tmp, metadata={"skip": str(config)}))
        else:
            program = torch.export.export(sub, (example,))
            _atomic(output / name, lambda tmp: torch.export.save(program, tmp))
        entry = {"skip": str(config), "file": name, "format": fmt,
                 "params": sum(p.numel() for p in sub.parameters()), "macs": count_macs(sub, example[:1])}
        if accuracy and str(config) in accuracy:
            entry.update(accuracy[str(config)])
        entries.append(entry)
    manifest = {"input_shape": list(example.shape[1:]), "subnetworks": entries}
    _atomic(output / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return entries

"""Classifying images with a trained checkpoint: the network, how images become its input, and what its
outputs are called, together (``adn predict`` and ``adn serve`` both use it).

    predictor = Predictor.from_checkpoint("runs/demo/checkpoint.pt")
    batch = predictor.preprocessing.load_files(["shoe.png"])
    top = predictor.top_k(predictor.logits(batch, skip="TTF"), k=3)   # [[{"class": "Sneaker", ...}, ...]]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..utils import jsonout
from ..vision.labels import class_names
from ..vision.preprocess import Preprocessing


@dataclass
class Predictor:
    net: nn.Module | None  # None: an exported switchable file runs the network (from_export)
    preprocessing: Preprocessing
    class_names: list[str]
    meta: dict

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> Predictor:
        """The checkpoint's network in eval mode, with its preprocessing and class names (indices for
        checkpoints that record none)."""
        from ..vision.checkpoint import load_network

        net, checkpoint = load_network(path)
        meta = checkpoint["meta"]
        preprocessing = Preprocessing.from_meta(meta, source=str(path))
        if preprocessing.channels != meta["in_channels"]:
            raise ValueError(
                f"{path} has invalid preprocessing metadata: {preprocessing.channels} channels for a "
                f"network that takes {meta['in_channels']}; it was altered"
            )
        return cls(net.eval(), preprocessing, class_names(meta, source=str(path)), meta)

    @classmethod
    def from_export(cls, folder: str | os.PathLike) -> tuple[Predictor, Path, dict]:
        """The preprocessing and class names of a switchable export folder (``adn export --format onnx
        --switchable``), without the network (``net`` is None: the ONNX file runs it), with the path of the file
        and the manifest."""
        folder = Path(folder)
        source = folder / "manifest.json"
        try:
            manifest = jsonout.loads(source.read_text(), source=str(source))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"--model-dir {folder}: cannot read {source} ({error}); give the folder written by adn "
                f"export --format onnx --switchable"
            ) from error
        if not isinstance(manifest, dict) or manifest.get("switchable") is not True or manifest.get("format") != "onnx":
            raise ValueError(
                f"--model-dir {folder}: {source} does not describe a switchable ONNX file; export one "
                f"with adn export --checkpoint C --format onnx --switchable --output {folder}"
            )
        missing = [
            key for key in ("file", "num_stages", "preprocess", "class_names", "input_shape") if key not in manifest
        ]
        file = folder / str(manifest.get("file", ""))
        if missing or not re.fullmatch(r"switchable\.onnx", file.name) or not file.is_file():
            raise ValueError(
                f"--model-dir {folder}: {source} lacks {', '.join(missing) or 'its file'} (written by an "
                f"older adn export, or altered); export again with adn export --format onnx --switchable"
            )
        meta = {
            "model": manifest.get("model", "exported"),
            "num_stages": int(manifest["num_stages"]),
            "num_classes": len(manifest["class_names"]),
            "in_channels": manifest["input_shape"][0],
            "preprocess": manifest["preprocess"],
            "class_names": manifest["class_names"],
        }
        preprocessing = Preprocessing.from_meta(meta, source=str(source))
        if list(preprocessing.input_shape) != list(manifest["input_shape"]):
            raise ValueError(
                f"{source}: preprocessing makes {list(preprocessing.input_shape)} images, the file takes "
                f"{manifest['input_shape']}; it was altered"
            )
        return cls(None, preprocessing, class_names(meta, source=str(source)), meta), file, manifest

    @property
    def num_stages(self) -> int:
        return self.net.num_stages if self.net is not None else self.meta["num_stages"]

    def logits(self, batch: torch.Tensor, skip) -> torch.Tensor:
        """The network's outputs for ``batch`` at depth ``skip`` (per call: safe from several threads)."""
        if self.net is None:
            raise ValueError("this predictor has no PyTorch network (it was read from an export folder)")
        with torch.inference_mode():
            return self.net(batch, skip=skip)

    def top_k(self, logits: torch.Tensor, k: int = 5) -> list[list[dict]]:
        """Per image, the ``k`` most probable classes, most probable first:
        ``{"class": name, "index": i, "probability": p}``."""
        return top_k(logits, self.class_names, k)


def depth_table_for(checkpoint: str | os.PathLike, table: str | os.PathLike | None, num_stages: int):
    """The depth table to choose depths from: ``table``, or ``depth_table.json`` next to the checkpoint
    (where ``adn depth-table`` writes it). Checked to describe a network of ``num_stages`` stages."""
    from ..core.skip import SkipConfig
    from .depth_table import DepthTable

    path = Path(table) if table else Path(checkpoint).parent / "depth_table.json"
    if not path.is_file():
        given = f"--table {path}" if table else f"no --table, and no depth_table.json next to the checkpoint ({path})"
        raise ValueError(
            f"{given}: choosing a depth for a budget needs a depth table. Make it with:  adn eval "
            f"--checkpoint {checkpoint} --json --no-latency --no-plot > eval.json  &&  adn depth-table "
            f"--checkpoint {checkpoint} --eval eval.json   (see docs/serving.md)"
        )
    loaded = DepthTable.load(path)
    for row in loaded.depths:
        try:
            SkipConfig(row["skip"], num_stages)
        except ValueError as error:
            raise ValueError(
                f"depth table {path} is not for this checkpoint's network ({num_stages} stages): {error}. "
                f"Measure one for it with adn depth-table"
            ) from error
    return loaded


def check_finite_outputs(logits: torch.Tensor, skip, images: list[str], source: str) -> None:
    """Refuse NaN or infinite outputs (a checkpoint whose layers overflow at this depth) instead of showing
    them as probabilities ("nan%"): name the depth and the images, and what to do."""
    finite = torch.isfinite(logits).all(dim=1)
    if bool(finite.all()):
        return
    bad = [images[i] for i in (~finite).nonzero().flatten().tolist()]
    raise ValueError(
        f"{source} gave NaN or infinite outputs at depth {skip} for {len(bad)} of {len(images)} image(s) "
        f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): its weights overflow at this depth, "
        f"so no answer can be given. Try another depth (--skip), check which depths work with adn eval "
        f"--checkpoint {source}, or retrain it (a lower --lr)"
    )


def top_k(logits: torch.Tensor, names: list[str], k: int = 5) -> list[list[dict]]:
    """Per row of ``logits``, the ``k`` (at most the number of classes) most probable classes by softmax."""
    probabilities = torch.softmax(logits.float(), dim=1)
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return [
        [{"class": names[i], "index": i, "probability": p} for p, i in zip(row_p, row_i)]
        for row_p, row_i in zip(values.tolist(), indices.tolist())
    ]

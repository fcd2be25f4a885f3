"""Shared fixtures: tiny learnable datasets the tests write themselves (no downloads)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Keep staged datasets out of the user's home; make runs repeatable.
    monkeypatch.setenv("ADN_DATA", str(tmp_path_factory.getbasetemp() / "adn-cache"))
    torch.manual_seed(0)


def synthetic_images(n: int, seed: int, size: int = 28, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is the size and brightness of a centred square (side 4 + 2 * class) over noise:
    unchanged by flips and small shifts (the training augmentation), easy to learn in a few steps,
    so loss and accuracy must move when training works."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    for i, label in enumerate(labels):
        side = 4 + 2 * int(label)
        start = (size - side) // 2
        images[i, start : start + side, start : start + side] = 100 + 15 * int(label)
    return images, labels


def write_idx(folder: Path, compress: bool = True, n_train: int = 512, n_test: int = 256) -> Path:
    """Fashion-MNIST-format IDX files (as the Debian package ships them: gzipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = synthetic_images(n, seed)
        blobs = {
            f"{split}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes(),
            f"{split}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.tobytes(),
        }
        for name, blob in blobs.items():
            if compress:
                with gzip.open(folder / f"{name}.gz", "wb") as handle:
                    handle.write(blob)
            else:
                (folder / name).write_bytes(blob)
    return folder


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> Path:
    return write_idx(tmp_path_factory.mktemp("fashion"))


def write_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def tiny_flags(data_path, steps: int = 1, data: str | None = "fashion-mnist", width: int = 4) -> list[str]:
    """The `adn train` flags of a tiny run: ResNet-20 at ``width`` for one epoch of ``steps`` steps on ``data``
    (None: the default data set, no ``--data`` flag) at ``data_path``."""
    return [
        "--model",
        "resnet20",
        "--width",
        str(width),
        *(["--data", data] if data is not None else []),
        "--data-path",
        str(data_path),
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        str(steps),
    ]


def tiny_train(data_path, output_dir, *extra: str, batch: int = 32, **flags) -> list[str]:
    """The argv of ``adn train`` for a tiny run (:func:`tiny_flags`: ``steps``, ``data``, ``width``) of
    ``batch`` images per step into ``output_dir``, without a progress bar; then ``extra`` (a repeated flag
    overrides the one before it)."""
    return [
        "train",
        *tiny_flags(data_path, **flags),
        "-b",
        str(batch),
        "--output-dir",
        str(output_dir),
        "--no-progress",
        *extra,
    ]

"""A small synthetic COCO-format dataset, written offline: shapes of three classes on textured, noisy
backgrounds, with boxes and polygon masks. It lets the detection code be trained, evaluated and tested
without downloading COCO, in COCO's own layout (so the same commands run on both)::

    OUTPUT/train2017/000000.png ...   OUTPUT/annotations/instances_train2017.json
    OUTPUT/val2017/000000.png ...     OUTPUT/annotations/instances_val2017.json

Objects do not overlap, so each polygon is exactly the visible mask. By default colours are random and
only the shape tells the class; ``colour_by_class`` makes the task easier for quick CPU runs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..utils.atomic import atomic_write
from ..utils.outputs import OutputError, json_file, output_folder

CLASSES = ("rectangle", "ellipse", "triangle")


CLASS_COLOURS = ((215, 45, 45), (45, 190, 70), (55, 85, 225))  # with colour_by_class: red, green, blue families


@dataclass(frozen=True)
class Style:
    """How images look. ``object_size``: an object's extent as a fraction of the image side.
    ``colour_by_class``: each class gets its own colour family on grey backgrounds (an easier task that
    short CPU runs learn quickly); otherwise colours are random and only the shape tells the class."""

    size: int = 128
    max_objects: int = 3
    object_size: tuple[float, float] = (0.2, 0.45)
    colour_by_class: bool = False


def make_synthetic_coco(
    output: str | os.PathLike,
    train_images: int = 64,
    val_images: int = 16,
    size: int = 128,
    max_objects: int = 3,
    seed: int = 0,
    object_size: tuple[float, float] = (0.2, 0.45),
    colour_by_class: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write the dataset under ``output``; returns a summary (paths, image and object counts). A folder
    that holds anything but an earlier synthetic dataset is refused unless ``overwrite``."""
    if train_images < 1 or val_images < 0:
        raise ValueError(
            f"need at least 1 training image and >= 0 validation images, got {train_images} and {val_images}"
        )
    if size < 32:
        raise ValueError(f"image size must be at least 32 pixels (shapes need room), got {size}")
    if max_objects < 1:
        raise ValueError(f"max objects per image must be at least 1, got {max_objects}")
    if not 0.05 <= object_size[0] <= object_size[1] <= 0.9:
        raise ValueError(
            f"object size must be a range of fractions of the image side within [0.05, 0.9], got {tuple(object_size)}"
        )
    style = Style(size, max_objects, (float(object_size[0]), float(object_size[1])), colour_by_class)
    root = Path(output)
    check_output(root, overwrite)
    summary = {"root": str(root), "classes": list(CLASSES), "size": size}
    for split, count, split_seed in (("train", train_images, seed), ("val", val_images, seed + 10_007)):
        if count > 0:
            summary[split] = _write_split(root, split, count, style, np.random.default_rng(split_seed))
    return summary


DESCRIPTION = "adn synthetic shapes (adn detect make-synthetic)"


def check_output(root: Path, overwrite: bool = False) -> None:
    """Refuse (:class:`~adn.utils.outputs.OutputError`) a folder adn cannot write, or one with contents
    other than an earlier synthetic dataset's (recognised by its annotation files), unless ``overwrite``."""
    folder = output_folder(root)
    if overwrite or not folder.is_dir() or not any(folder.iterdir()):
        return
    ours = any(
        json_file(
            folder / "annotations" / f"instances_{split}2017.json",
            lambda data: (
                isinstance(data, dict)
                and isinstance(data.get("info"), dict)
                and data["info"].get("description") == DESCRIPTION
            ),
        )
        for split in ("train", "val")
    )
    if not ours:
        raise OutputError(
            f"--output {root} is a folder that holds other files, not a synthetic dataset adn wrote; "
            f"choose a new or empty folder, or add --overwrite to write into it (files of the same "
            f"names are replaced)"
        )


def _write_split(root: Path, split: str, count: int, style: Style, rng: np.random.Generator) -> dict:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    size = style.size
    images, annotations = [], []
    for image_id in range(1, count + 1):
        picture, shapes = _draw_image(style, rng)
        name = f"{image_id:06d}.png"
        picture.save(folder / name)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for category, polygon in shapes:
            xs, ys = polygon[0::2], polygon[1::2]
            x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
            box = [x0, y0, min(max(xs), size) - x0, min(max(ys), size) - y0]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [round(v, 2) for v in box],
                    "area": round(_polygon_area(xs, ys), 2),
                    "iscrowd": 0,
                    "segmentation": [[round(v, 2) for v in polygon]],
                }
            )
    data = {
        "info": {"description": DESCRIPTION},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)],
    }
    path = root / "annotations" / f"instances_{split}2017.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))
    return {"images": count, "objects": len(annotations), "image_dir": str(folder), "annotations": str(path)}


def _draw_image(style: Style, rng: np.random.Generator) -> tuple[Image.Image, list]:
    size = style.size
    background = _texture(size, style.colour_by_class, rng)
    picture = Image.fromarray(background)
    draw = ImageDraw.Draw(picture)
    placed: list[tuple[float, float, float, float]] = []
    shapes = []
    for _ in range(int(rng.integers(1, style.max_objects + 1))):
        for _attempt in range(30):  # find a free spot; give up on this object if the image is full
            category = int(rng.integers(len(CLASSES)))
            polygon = _shape(CLASSES[category], size, rng.uniform(*style.object_size) * size, rng)
            xs, ys = polygon[0::2], polygon[1::2]
            box = (min(xs) - 2, min(ys) - 2, max(xs) + 2, max(ys) + 2)
            if all(box[2] < p[0] or box[0] > p[2] or box[3] < p[1] or box[1] > p[3] for p in placed):
                placed.append(box)
                colour = (
                    _class_colour(category, rng)
                    if style.colour_by_class
                    else _contrasting_colour(background.mean((0, 1)), rng)
                )
                draw.polygon(list(zip(xs, ys)), fill=colour)
                shapes.append((category + 1, polygon))
                break
    noisy = np.asarray(picture, dtype=np.float32) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8)), shapes


def _texture(size: int, grey: bool, rng: np.random.Generator) -> np.ndarray:
    """A base colour (grey with ``grey``) plus two random gratings: structure the detector must learn to
    ignore."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.full(3, rng.uniform(60, 190)) if grey else rng.uniform(40, 215, 3)
    image = np.tile(base, (size, size, 1))
    for _ in range(2):
        angle, cycles = rng.uniform(0, math.pi), rng.uniform(2, 8)
        wave = np.sin(
            2 * math.pi * cycles * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 2 * math.pi)
        )
        image += wave[..., None] * rng.uniform(-25, 25, 3)
    return image.clip(0, 255).astype(np.uint8)


def _shape(name: str, size: int, extent: float, rng: np.random.Generator) -> list[float]:
    """A polygon [x1, y1, x2, y2, ...] of the class, ``extent`` pixels across, fully inside the image."""
    cx, cy = rng.uniform(extent / 2 + 1, size - extent / 2 - 1, 2)
    if name == "rectangle":
        w, h = extent, extent * rng.uniform(0.45, 0.9)
        if rng.random() < 0.5:
            w, h = h, w
        points = [
            (cx - w / 2, cy - h / 2),
            (cx + w / 2, cy - h / 2),
            (cx + w / 2, cy + h / 2),
            (cx - w / 2, cy + h / 2),
        ]
    elif name == "ellipse":
        rx, ry = extent / 2, extent / 2 * rng.uniform(0.5, 1.0)
        if rng.random() < 0.5:
            rx, ry = ry, rx
        points = [
            (cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)
        ]
    else:  # an equilateral triangle, randomly turned
        turn = rng.uniform(0, 2 * math.pi / 3)
        angles = [turn + k * 2 * math.pi / 3 for k in range(3)]
        points = [(cx + extent / 2 * math.cos(a), cy + extent / 2 * math.sin(a)) for a in angles]
    return [float(v) for point in points for v in point]


def _class_colour(category: int, rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in CLASS_COLOURS[category])


def _contrasting_colour(background: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    for _ in range(50):
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - background).sum() > 150:
            break
    return tuple(int(c) for c in colour)


def _polygon_area(xs: list[float], ys: list[float]) -> float:
    return 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))

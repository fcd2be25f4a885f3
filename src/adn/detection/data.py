"""COCO-format detection data: an image folder plus an instances JSON file.

The JSON is checked once, up front, so that a bad file fails with a message naming the annotation, what
was wrong and how to fix it, not with a shape error deep inside the detector. Images become
``tv_tensors.Image``, boxes ``tv_tensors.BoundingBoxes`` (XYXY), masks ``tv_tensors.Mask``, so
torchvision's v2 transforms move them together.

Layouts :func:`find_split` understands (``--data-path ROOT``), the one COCO 2017 ships and the one
``adn detect make-synthetic`` writes::

    ROOT/train2017/*.jpg   ROOT/val2017/*.jpg   ROOT/annotations/instances_{train,val}2017.json
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import DataError
from ..vision.data import read_image

FORMAT_HELP = "see https://cocodataset.org/#format-data"
BOX_TOLERANCE = 1.0  # pixels a box may overshoot the image (rounding in real files); clipped, not rejected


class AnnotationError(DataError):
    """An instances JSON file is not usable; the message names the entry and the fix."""


# ----- the annotation file -------------------------------------------------------------------------------
@dataclass
class Annotations:
    """A validated instances file: ``images`` by id, the annotations of each image (``per_image``; crowd
    regions included and flagged: COCO evaluation ignores them, training drops them as torchvision's
    reference does), the ``categories`` in file order (position + 1 is the detector's label), and
    ``raw``, the file's content with defaults filled in (``iscrowd``, ``area``) for pycocotools."""

    path: Path
    raw: dict
    images: dict[int, dict]
    per_image: dict[int, list[dict]]
    categories: list[dict]

    @property
    def image_ids(self) -> list[int]:
        return list(self.images)

    def label_of(self, category_id: int) -> int:
        return self._labels[category_id]

    def category_of(self, label: int) -> int:
        return self.categories[label - 1]["id"]

    def __post_init__(self):
        self._labels = {c["id"]: i + 1 for i, c in enumerate(self.categories)}


def load_annotations(path: str | os.PathLike, need_masks: bool = False) -> Annotations:
    """Read and check an instances JSON file. ``need_masks``: every non-crowd annotation must carry a
    ``segmentation`` (Mask R-CNN trains on it)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(
            f"annotation file {path} does not exist (COCO keeps them in annotations/instances_<split>.json)"
        )
    try:
        raw = json.loads(path.read_text())
    except ValueError as error:
        raise AnnotationError(f"annotation file {path} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise AnnotationError(
            f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'; {FORMAT_HELP}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            raise AnnotationError(
                f"{path} lacks the '{key}' list (a COCO instances file has 'images', 'annotations' "
                f"and 'categories'); {FORMAT_HELP}"
            )
    if not raw["categories"]:
        raise AnnotationError(f'{path}: \'categories\' is empty; list every object class as {{"id": 1, "name": "cat"}}')
    categories = [_check_fields(c, ("id", "name"), "category", path) for c in raw["categories"]]
    _check_unique([c["id"] for c in categories], "category", path)
    images = {}
    for image in raw["images"]:
        _check_fields(image, ("id", "file_name", "width", "height"), "image", path)
        if not (_is_int(image["width"]) and _is_int(image["height"]) and image["width"] > 0 and image["height"] > 0):
            raise AnnotationError(
                f"{path}: image {image['id']} ({image['file_name']}) has width {image['width']!r} "
                f"and height {image['height']!r}; both must be positive integers (pixels)"
            )
        if image["id"] in images:
            raise AnnotationError(f"{path}: image id {image['id']} appears twice; image ids must be unique")
        images[image["id"]] = image
    category_ids = {c["id"] for c in categories}
    per_image: dict[int, list[dict]] = {i: [] for i in images}
    for annotation in raw["annotations"]:
        _check_fields(annotation, ("id", "image_id", "category_id", "bbox"), "annotation", path)
        where = f"{path}: annotation {annotation['id']}"
        image = images.get(annotation["image_id"])
        if image is None:
            raise AnnotationError(f"{where} refers to image_id {annotation['image_id']}, which is not in 'images'")
        if annotation["category_id"] not in category_ids:
            raise AnnotationError(
                f"{where} has category_id {annotation['category_id']}, which is not in 'categories' "
                f"(known ids: {sorted(category_ids)[:20]})"
            )
        annotation = dict(annotation, bbox=_check_box(annotation["bbox"], image, where))
        annotation.setdefault("iscrowd", 0)
        annotation.setdefault("area", annotation["bbox"][2] * annotation["bbox"][3])
        if "segmentation" in annotation:
            _check_segmentation(annotation["segmentation"], image, where)
        elif need_masks and not annotation["iscrowd"]:
            raise AnnotationError(
                f"{where} has no 'segmentation'; Mask R-CNN trains on masks (polygons or RLE). "
                f"Add them, or train a fasterrcnn_* model on boxes alone"
            )
        per_image[image["id"]].append(annotation)
    if not raw["annotations"]:
        raise AnnotationError(f"{path} has no annotations; there is nothing to train on or evaluate against")
    raw = dict(raw, annotations=[a for anns in per_image.values() for a in anns])  # with defaults filled in
    return Annotations(path, raw, images, per_image, categories)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(entry, names: tuple[str, ...], what: str, path: Path) -> dict:
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: every {what} must be a JSON object, got {entry!r:.80}")
    missing = [n for n in names if n not in entry]
    if missing:
        ident = f" {entry['id']}" if "id" in entry else f" {entry!r:.80}"
        raise AnnotationError(
            f"{path}: {what}{ident} lacks {', '.join(repr(m) for m in missing)}; every {what} needs "
            f"{', '.join(names)}; {FORMAT_HELP}"
        )
    return entry


def _check_unique(ids: list, what: str, path: Path) -> None:
    seen = set()
    for i in ids:
        if i in seen:
            raise AnnotationError(f"{path}: {what} id {i} appears twice; ids must be unique")
        seen.add(i)


def _check_box(box, image: dict, where: str) -> list[float]:
    """[x, y, width, height] in pixels, inside the image (up to BOX_TOLERANCE, then clipped)."""
    if not (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    ):
        raise AnnotationError(f"{where}: bbox {box!r} must be 4 finite numbers [x, y, width, height]")
    x, y, w, h = (float(v) for v in box)
    W, H = image["width"], image["height"]
    if w < 0 or h < 0:
        raise AnnotationError(
            f"{where}: bbox {box} has a negative width or height; COCO boxes are "
            f"[x, y, width, height], not corner coordinates"
        )
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > W + BOX_TOLERANCE or y + h > H + BOX_TOLERANCE:
        hint = (
            " It looks like [x1, y1, x2, y2]; COCO boxes are [x, y, width, height]."
            if w <= W and h <= H and w > x and h > y
            else ""
        )
        raise AnnotationError(
            f"{where}: bbox {box} reaches outside image {image['id']} ({image['file_name']}, "
            f"{W}x{H} pixels): x + width = {x + w:g}, y + height = {y + h:g}.{hint} Fix the "
            f"box or the image's width/height"
        )
    x0, y0 = min(max(x, 0.0), W), min(max(y, 0.0), H)
    return [x0, y0, max(min(x + w, W) - x0, 0.0), max(min(y + h, H) - y0, 0.0)]  # empty boxes are dropped later


def _check_segmentation(seg, image: dict, where: str) -> None:
    if isinstance(seg, list):
        for polygon in seg:
            if not (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0):
                raise AnnotationError(
                    f"{where}: a segmentation polygon must be a flat list [x1, y1, x2, y2, ...] "
                    f"of at least 3 points, got {polygon!r:.80}"
                )
    elif isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise AnnotationError(f"{where}: an RLE segmentation needs 'counts' and 'size'")
        if list(seg["size"]) != [image["height"], image["width"]]:
            raise AnnotationError(
                f"{where}: RLE size {seg['size']} differs from the image's [height, width] "
                f"[{image['height']}, {image['width']}]"
            )
    else:
        raise AnnotationError(
            f"{where}: segmentation must be a list of polygons or an RLE object, got {type(seg).__name__}"
        )


def decode_mask(seg, height: int, width: int) -> torch.Tensor:
    """A polygon list or RLE (compressed or not) as a uint8 [H, W] mask, via pycocotools."""
    mask_utils = pycocotools_mask()
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    with warnings.catch_warnings():  # pycocotools 2.0.11 + numpy 2 warn inside decode; harmless, once per worker
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return torch.from_numpy(mask_utils.decode(rle)).to(torch.uint8)


def pycocotools_mask():
    try:
        from pycocotools import mask
    except ImportError as error:
        raise DataError("masks and COCO evaluation need pycocotools: pip install 'adn[detection]'") from error
    return mask


# ----- the dataset ------------------------------------------------------------------------------------------
def train_transforms(hflip: bool = True) -> v2.Compose:
    """As torchvision's detection reference ("hflip" policy); resizing is the detector's own job."""
    steps = [v2.ToImage()] + ([v2.RandomHorizontalFlip(0.5)] if hflip else [])
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True)])


def eval_transforms() -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


class CocoDetection(Dataset):
    """``(image, target)`` pairs for torchvision's detectors: target has ``boxes`` (XYXY), ``labels``
    (category position + 1), ``masks`` (with ``masks=True``), ``image_id``, ``area``, ``iscrowd``.
    Crowd regions and boxes of zero width or height are dropped, as in torchvision's reference."""

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotations: Annotations | str | os.PathLike,
        transforms=None,
        masks: bool = False,
    ):
        self.root = Path(images_dir)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        self.annotations = annotations if isinstance(annotations, Annotations) else load_annotations(annotations, masks)
        self.ids = self.annotations.image_ids
        self.transforms = transforms
        self.masks = masks

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.annotations.images[image_id]
        path = self.root / info["file_name"]
        try:
            image = read_image(path)  # 16-bit images scaled, decoder warnings reported
        except (OSError, ValueError) as error:
            raise DataError(
                f"cannot read image {path} (image {image_id} of {self.annotations.path}): {error}"
            ) from error
        if image.size != (info["width"], info["height"]):
            raise DataError(
                f"image {path} is {image.size[0]}x{image.size[1]} pixels but {self.annotations.path} says "
                f"{info['width']}x{info['height']}; fix the file's width/height"
            )
        target = self.target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def target(self, image_id: int) -> dict:
        info = self.annotations.images[image_id]
        size = (info["height"], info["width"])
        kept = [
            a
            for a in self.annotations.per_image[image_id]
            if not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0
        ]
        boxes = torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in kept)], dtype=torch.float32
        ).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size),
            "labels": torch.tensor([self.annotations.label_of(a["category_id"]) for a in kept], dtype=torch.int64),
            "image_id": image_id,
            "area": torch.tensor([float(a["area"]) for a in kept], dtype=torch.float32),
            "iscrowd": torch.zeros(len(kept), dtype=torch.int64),
        }
        if self.masks:
            masks = [decode_mask(a["segmentation"], *size) for a in kept]
            target["masks"] = tv_tensors.Mask(
                torch.stack(masks) if masks else torch.zeros((0, *size), dtype=torch.uint8)
            )
        return target


def fixed_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A fixed random subset of ``size`` images (in file order), or the whole set."""
    if size is None or size >= len(dataset):
        return dataset
    if size < 1:
        raise ValueError(f"a subset needs at least 1 image, got {size}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[:size]))


def collate(batch: list) -> tuple[list, list]:
    """Detectors take lists (images differ in size)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# ----- where the files are ----------------------------------------------------------------------------------
def find_split(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image folder, instances JSON) of ``split`` ('train' or 'val') under ``root``: COCO 2017 names
    (``val2017/``, ``annotations/instances_val2017.json``) or the same without the year."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data-path {root} is not a folder")
    for name in (f"{split}2017", split):
        images, ann = root / name, root / "annotations" / f"instances_{name}.json"
        if images.is_dir() and ann.is_file():
            return images, ann
    raise DataError(
        f"no {split} split under {root}: expected {split}2017/ (images) and "
        f"annotations/instances_{split}2017.json, as COCO 2017 ships them (or the same without '2017'); "
        f"pass the files explicitly with --{split}-images and --{split}-ann"
    )

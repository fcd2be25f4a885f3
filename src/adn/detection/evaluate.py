"""COCO box AP and mask AP of detector sub-networks (pycocotools' COCOeval), plus their cost.

The data are read once: every batch runs through every requested sub-network (switching depth costs
microseconds), and each sub-network's detections are scored separately.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..runtime.profile import count_macs
from ..core.skip import SkipConfig
from .data import Annotations, collate, pycocotools_mask

# COCOeval.stats positions, reported in percent as in the paper's Table 4.
STATS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


@torch.no_grad()
def predict(
    detector: nn.Module,
    dataset: Dataset,
    configs,
    annotations: Annotations,
    device="cpu",
    batch_size: int = 2,
    workers: int = 0,
    masks: bool | None = None,
    progress: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, list[dict]]:
    """Detections of each sub-network in ``configs`` as COCO result entries (boxes [x, y, w, h],
    category ids, scores, and RLE masks for Mask R-CNN). ``shard=(rank, world_size)``: this process
    takes every world_size-th image."""
    configs = [SkipConfig(c, detector.num_stages) for c in configs]
    masks = detector.roi_heads.has_mask() if masks is None else masks
    rank, world = shard
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    results: dict[str, list[dict]] = {str(c): [] for c in configs}
    was_training = detector.training
    detector.eval()
    try:
        for images, targets in tqdm(loader, desc="detect", disable=not progress, leave=False):
            images = [image.to(device, non_blocking=True) for image in images]
            for config in configs:
                for output, target in zip(detector(images, skip=config), targets):
                    results[str(config)] += coco_results(output, target["image_id"], annotations, masks)
    finally:
        detector.train(was_training)
    return results


def coco_results(output: dict, image_id: int, annotations: Annotations, masks: bool) -> list[dict]:
    """One image's detections as COCO result entries."""
    boxes = output["boxes"].detach().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]  # XYXY -> XYWH
    entries = [
        {
            "image_id": image_id,
            "category_id": annotations.category_of(int(label)),
            "bbox": [round(v, 2) for v in box],
            "score": float(score),
        }
        for box, label, score in zip(boxes.tolist(), output["labels"].tolist(), output["scores"].tolist())
    ]
    if masks and entries:
        mask_utils = pycocotools_mask()
        binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for entry, mask in zip(entries, binary):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-friendly; pycocotools accepts str
            entry["segmentation"] = rle
    return entries


def coco_metrics(
    annotations: Annotations, results: list[dict], iou_type: str = "bbox", image_ids: list[int] | None = None
) -> dict[str, float]:
    """COCOeval's AP figures in percent (``ap`` is AP@[.5:.95]); 0 when there is no detection at all,
    None where COCO defines none (no ground truth of that size)."""
    if not results:
        return {key: 0.0 for key in STATS}
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; stdout is for results
        ground_truth = COCO()
        ground_truth.dataset = annotations.raw
        ground_truth.createIndex()
        detections = ground_truth.loadRes(results)
        evaluation = COCOeval(ground_truth, detections, iou_type)
        if image_ids is not None:
            evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {key: (None if value < 0 else 100.0 * float(value)) for key, value in zip(STATS, evaluation.stats)}


def score(
    annotations: Annotations, results: dict[str, list[dict]], masks: bool, image_ids: list[int] | None = None
) -> dict[str, dict[str, float]]:
    """``{skip: {"box_ap": .., "box_ap50": .., ..., "mask_ap": ..}}`` for each sub-network's detections."""
    scores = {}
    for skip, entries in results.items():
        row = {f"box_{k}": v for k, v in coco_metrics(annotations, entries, "bbox", image_ids).items()}
        if masks:
            row.update({f"mask_{k}": v for k, v in coco_metrics(annotations, entries, "segm", image_ids).items()})
        scores[skip] = row
    return scores


def backbone_macs(detector: nn.Module, image: torch.Tensor, config) -> int:
    """MACs of the backbone (ResNet body + FPN) of sub-network ``config`` on ``image`` after the
    detector's own resizing. The heads' cost depends on the number of detections, so it is left out."""
    was_training = detector.training
    detector.eval()
    try:
        with torch.no_grad():
            batch, _ = detector.transform([image])
        with detector.skipping(config):
            return count_macs(detector.backbone, batch.tensors)
    finally:
        detector.train(was_training)


def evaluate_detector(
    detector: nn.Module,
    dataset: Dataset,
    annotations: Annotations,
    configs,
    device="cpu",
    batch_size: int = 2,
    workers: int = 0,
    progress: bool = True,
) -> list[dict]:
    """``adn detect eval``'s rows, super-net first: skip, box AP (and mask AP), backbone MACs per image,
    active parameters."""
    configs = [SkipConfig(c, detector.num_stages) for c in configs]
    masks = detector.roi_heads.has_mask()
    results = predict(detector, dataset, configs, annotations, device, batch_size, workers, masks, progress)
    scores = score(annotations, results, masks, image_ids(dataset))
    example = dataset[0][0].to(device)
    rows = [
        {
            "skip": str(config),
            **scores[str(config)],
            "detections": len(results[str(config)]),
            "backbone_macs": backbone_macs(detector, example, config),
            "params": detector.active_parameters(config),
        }
        for config in configs
    ]
    super_row = next((r for r in rows if SkipConfig(r["skip"]).is_super), None)
    for row in rows:
        if super_row is not None:
            row["macs_ratio"] = row["backbone_macs"] / super_row["backbone_macs"]
    return rows


def image_ids(dataset: Dataset) -> list[int]:
    """The COCO image ids a (possibly subset) CocoDetection holds: COCOeval scores only those."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = image_ids(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return list(dataset.ids)

"""Adaptive depth backbones for object detection and instance segmentation (paper, section 4.5).

    from adn.detection import build_detector
    detector = build_detector("maskrcnn_resnet50_fpn", num_classes=91, backbone_weights="runs/adn/checkpoint.pt")
    detector.skip = "TTFF"                  # as on a classifier; also detector(images, skip="base")
    with detector.skipping("base"): ...

Modules: ``backbone`` (building and converting detectors), ``data`` (COCO-format data, checked),
``synthetic`` (an offline shapes dataset), ``train`` (Algorithm 1 on FPN features, baselines),
``evaluate`` (COCO AP per sub-network), ``checkpoint``, ``cli`` (``adn detect``). Masks and COCO
evaluation need pycocotools (``pip install 'adn[detection]'``).
"""

from .backbone import DETECTOR_MODELS, DetectorName, build_detector, capture_backbone, convert_detector
from .data import AnnotationError, CocoDetection, load_annotations
from .synthetic import make_synthetic_coco

__all__ = [
    "DETECTOR_MODELS",
    "AnnotationError",
    "CocoDetection",
    "DetectorName",
    "build_detector",
    "capture_backbone",
    "convert_detector",
    "load_annotations",
    "make_synthetic_coco",
]

"""Adaptive depth backbones in Faster R-CNN / Mask R-CNN: conversion keeps torchvision's outputs, depth
switching reaches the modules that run, frozen norms stay frozen, training raises AP at both depths,
COCO evaluation scores what it should, and bad annotation files fail with messages a user can act on."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

import adn
from adn.errors import CheckpointError
from adn.utils.checkpoint_file import save_checkpoint
from adn.cli import main
from adn.detection import AnnotationError, CocoDetection, build_detector, convert_detector, load_annotations
from adn.detection.data import decode_mask, eval_transforms, train_transforms
from adn.detection.evaluate import coco_metrics, predict, score
from adn.detection.train import adn_step, individual_step, joint_step
from adn.core.layers import SkipAwareNorm
from adn.runtime.profile import count_macs

SMALL = dict(
    min_size=64,
    max_size=64,
    rpn_pre_nms_top_n_train=100,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=50,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=32,
    box_detections_per_img=10,
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """72 training and 24 validation images of 64x64 pixels, classes coloured (learnable in a short run)."""
    root = tmp_path_factory.mktemp("shapes")
    assert (
        main(
            [
                "detect",
                "make-synthetic",
                "--output",
                str(root),
                "--images",
                "72",
                "--val-images",
                "24",
                "--size",
                "64",
                "--colour-by-class",
                "--seed",
                "3",
                "--json",
            ]
        )
        == 0
    )
    return root


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial norm statistics, so that a wrong norm (or twin) would change the outputs."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            for name, low, high in (
                ("weight", 0.5, 1.5),
                ("bias", -0.2, 0.2),
                ("running_mean", -0.2, 0.2),
                ("running_var", 0.5, 2.0),
            ):
                tensor = getattr(module, name)
                with torch.no_grad():
                    tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=generator))


def _images():
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, 64, 56, generator=generator), torch.rand(3, 48, 64, generator=generator)]


# ----- backbone ----------------------------------------------------------------------------------------------------
def test_conversion_keeps_torchvision_detector_outputs_in_super_net_mode():
    torch.manual_seed(0)
    reference = FasterRCNN(
        resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5),
        num_classes=4,
        min_size=64,
        max_size=64,
    ).eval()
    _randomize_norms(reference)
    images = _images()
    with torch.no_grad():
        expected = reference(images)
    assert all(len(e["boxes"]) > 0 for e in expected), "nothing detected: the comparison would be vacuous"

    detector = convert_detector(copy.deepcopy(reference)).eval()
    assert detector.num_stages == 4 and str(detector.skip) == "FFFF"
    # Our builder makes the same modules with the same names: torchvision's weights load into it.
    built = build_detector("fasterrcnn_resnet18_fpn", 4, frozen_bn=True, min_size=64, max_size=64).eval()
    missing = built.load_state_dict(reference.state_dict(), strict=False).missing_keys
    assert missing and all(".twin." in key for key in missing)
    for module in built.modules():
        if isinstance(module, SkipAwareNorm):
            module.sync_twin()
    with torch.no_grad():
        for outputs in (detector(images), built(images)):
            for got, want in zip(outputs, expected):
                assert got.keys() == want.keys()
                for key in want:
                    assert torch.equal(got[key], want[key]), key
        base = detector(images, skip="base")
    assert not torch.equal(base[0]["scores"], expected[0]["scores"])  # skipping changes the computation


@pytest.mark.parametrize(
    "name",
    ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"],
)
def test_builders_match_torchvision_module_for_module(name):
    with torch.device("meta"):  # shapes and names only: no memory, no initialisation cost
        reference = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5)
        ours = build_detector(name, 5)
    shapes = {k: v.shape for k, v in ours.state_dict().items() if ".twin." not in k}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    assert ours.num_stages == 4 and [s["skippable"] for s in ours.adn_info["stages"]] == [1, 2, 3, 1]


def test_depth_switching_acts_on_the_modules_that_run():
    torch.manual_seed(0)
    detector = build_detector("maskrcnn_resnet18_fpn", 4, fpn_channels=32, **SMALL).eval()
    body = detector.backbone.body
    in_body = {id(m) for m in body.modules()}
    skippable = [b for stage in detector.adn_stages for b in stage.skippable]
    twins = [n.twin for stage in detector.adn_stages for n in stage.norms]
    assert skippable and twins and all(id(m) in in_body for m in skippable + twins)
    # A skipped block is still called (it returns its input), so count the convolutions inside it.
    convs = [b.conv1 for b in skippable]
    calls = {}
    handles = [
        m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls.get(id(mod), 0) + 1))
        for m in convs + twins
    ]
    images = _images()[:1]
    with torch.no_grad():
        detector(images)  # super-net: every block, no twin
        assert all(calls.get(id(c)) == 1 for c in convs) and not any(id(t) in calls for t in twins)
        calls.clear()
        with detector.skipping("base"):
            detector(images)
        assert not any(id(c) in calls for c in convs) and all(calls.get(id(t)) == 1 for t in twins)
        assert str(detector.skip) == "FFFF"  # restored
        calls.clear()
        detector(images, skip="TFFF")
        assert id(convs[0]) not in calls and all(id(c) in calls for c in convs[1:])
    for handle in handles:
        handle.remove()
    with pytest.raises(ValueError, match="4 stages"):
        detector.skip = "TTF"

    batch = torch.rand(1, 3, 64, 64)
    macs = {}
    for config in ("FFFF", "TFFF", "TTFF", "TTTF", "TTTT", "FFFT"):
        with detector.skipping(config):
            macs[config] = count_macs(detector.backbone, batch)
    assert macs["FFFF"] > macs["TFFF"] > macs["TTFF"] > macs["TTTF"] > macs["TTTT"] > 0
    assert macs["FFFT"] < macs["FFFF"]
    plain = detector.subnet("TTTT").eval()  # a standalone torchvision MaskRCNN of that depth
    assert type(plain) is torchvision.models.detection.MaskRCNN
    with torch.no_grad():
        assert torch.equal(plain(images)[0]["scores"], detector(images, skip="TTTT")[0]["scores"])


def test_frozen_batch_norm_twins_follow_torchvision_recipe(tmp_path):
    resnet = torchvision.models.resnet18()
    _randomize_norms(resnet)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    # With backbone weights torchvision's v1 recipe freezes norms and trains the last 3 layers.
    detector = build_detector("fasterrcnn_resnet18_fpn", 3, backbone_weights=str(tmp_path / "resnet18.pth"))
    body = detector.backbone.body
    norms = [m for m in body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    twin = body.layer3[0].bn1.twin
    assert isinstance(twin, FrozenBatchNorm2d) and torch.equal(twin.running_var, resnet.layer3[0].bn1.running_var)
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())

    # Trainable norms (the v2 recipe): a twin is frozen exactly when its norm is.
    detector = build_detector(
        "fasterrcnn_resnet18_fpn", 3, backbone_weights=resnet, frozen_bn=False, trainable_layers=2
    )
    skip_aware = [m for m in detector.modules() if isinstance(m, SkipAwareNorm)]
    assert skip_aware and all(isinstance(m, nn.BatchNorm2d) for m in skip_aware)
    for norm in skip_aware:
        for mine, twins in zip(norm.parameters(recurse=False), norm.twin.parameters()):
            assert mine.requires_grad == twins.requires_grad
    assert not detector.backbone.body.layer2[0].bn1.twin.weight.requires_grad
    assert detector.backbone.body.layer3[0].bn1.twin.weight.requires_grad


def test_backbone_from_an_adn_train_checkpoint(tmp_path):
    net = adn.convert(torchvision.models.resnet18(num_classes=10))
    with torch.no_grad():
        net.layer2[0].bn2.twin.running_mean.fill_(0.25)  # a trained twin differs from its norm
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, net, {"model": "resnet18", "num_classes": 10, "in_channels": 3, "skip_aware_norm": True})
    detector = build_detector("maskrcnn_resnet18_fpn", 3, backbone_weights=str(path))
    twin = detector.backbone.body.layer2[0].bn2.twin
    assert isinstance(twin, FrozenBatchNorm2d) and torch.all(twin.running_mean == 0.25)
    assert torch.equal(detector.backbone.body.conv1.weight, net.conv1.weight)
    with pytest.raises(CheckpointError, match="resnet18.*backbone is resnet50"):
        build_detector("maskrcnn_resnet50_fpn", 3, backbone_weights=str(path))
    with pytest.raises(ValueError, match="no such file"):
        build_detector("maskrcnn_resnet18_fpn", 3, backbone_weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("retinanet_resnet50_fpn", 3)


# ----- training steps ----------------------------------------------------------------------------------------------
def test_training_steps_train_what_each_method_should(shapes):
    dataset = CocoDetection(
        shapes / "train2017", shapes / "annotations/instances_train2017.json", train_transforms(), masks=True
    )
    images, targets = zip(*[dataset[i] for i in range(2)])
    torch.manual_seed(0)
    detector = build_detector("maskrcnn_resnet18_fpn", 4, fpn_channels=32, **SMALL).train()
    skippable = [p for stage in detector.adn_stages for b in stage.skippable for p in b.parameters()]
    twins = [p for stage in detector.adn_stages for n in stage.norms for p in n.twin.parameters()]
    head = list(detector.roi_heads.parameters())

    def grads(parameters):
        return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in parameters]

    terms = adn_step(detector, list(images), list(targets))
    assert {"loss_classifier", "loss_mask", "kd_fpn", "loss"} <= set(terms) and terms["kd_fpn"] > 0
    assert all(grads(skippable)) and all(grads(twins)) and all(grads(head))  # twins learn from the KD pass
    assert str(detector.skip) == "FFFF"
    detector.zero_grad(set_to_none=True)
    terms = joint_step(detector, list(images), list(targets))
    assert {"loss_super", "loss_base"} <= set(terms) and all(grads(twins))
    detector.zero_grad(set_to_none=True)
    detector.skip = "base"
    individual_step(detector, list(images), list(targets))
    assert not any(grads(skippable)) and all(grads(twins))


# ----- evaluation --------------------------------------------------------------------------------------------------
def test_coco_evaluation_of_a_tiny_set(shapes):
    annotations = load_annotations(shapes / "annotations/instances_val2017.json", need_masks=True)
    ids = annotations.image_ids[:4]
    perfect, shifted = [], []
    from pycocotools import mask as mask_utils

    for image_id in ids:
        info = annotations.images[image_id]
        for ann in annotations.per_image[image_id]:
            mask = decode_mask(ann["segmentation"], info["height"], info["width"]).numpy()
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode()
            entry = {
                "image_id": image_id,
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "score": 0.9,
                "segmentation": rle,
            }
            perfect.append(entry)
            x, y, w, h = ann["bbox"]
            shifted.append(dict(entry, bbox=[x + w / 3, y + h / 3, w, h]))
    assert coco_metrics(annotations, perfect, "bbox", ids)["ap"] == pytest.approx(100.0)
    assert coco_metrics(annotations, perfect, "segm", ids)["ap"] == pytest.approx(100.0)
    assert coco_metrics(annotations, shifted, "bbox", ids)["ap"] < 50.0
    wrong = [dict(e, category_id=e["category_id"] % 3 + 1) for e in perfect]
    assert coco_metrics(annotations, wrong, "bbox", ids)["ap"] == 0.0
    assert coco_metrics(annotations, [], "bbox", ids)["ap"] == 0.0


# ----- the short training run ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_short_training_raises_ap_of_super_and_base_net_and_every_subnetwork_evaluates(shapes, tmp_path, capsys):
    """A ResNet-18-FPN Mask R-CNN-ADN trained from scratch for 72 steps on CPU (one epoch, then resumed
    for a second): AP of both the super-net and the base-net rises from about 0 to well above. Over 8
    seeds of data and initialisation, the lowest box AP50 seen after this run was 11.9 (super-net) and
    13.3 (base-net), the lowest mask AP50 11.1 and box AP 3.2; an untrained detector scores below 1."""
    flags = [
        "detect",
        "train",
        "--model",
        "maskrcnn_resnet18_fpn",
        "--data-path",
        str(shapes),
        "-b",
        "2",
        "-j",
        "0",
        "--opt",
        "adamw",
        "--lr",
        "1e-3",
        "--lr-scheduler",
        "constant",
        "--lr-warmup-iters",
        "20",
        "--fpn-channels",
        "64",
        "--min-size",
        "64",
        "--max-size",
        "64",
        "--rpn-proposals-train",
        "200",
        "--rpn-proposals-test",
        "100",
        "--box-batch-size-per-image",
        "64",
        "--detections-per-image",
        "20",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(flags + ["--epochs", "1"]) == 0
    assert main(flags + ["--epochs", "2", "--resume", str(tmp_path / "checkpoint.pt")]) == 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["steps"] == 36

    # The untrained detector (same initialisation) on the same images.
    torch.manual_seed(0)
    untrained = build_detector(
        "maskrcnn_resnet18_fpn",
        4,
        fpn_channels=64,
        min_size=64,
        max_size=64,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=100,
        box_detections_per_img=20,
    )
    annotations = load_annotations(shapes / "annotations/instances_val2017.json")
    val = CocoDetection(shapes / "val2017", annotations, eval_transforms())
    before = score(annotations, predict(untrained, val, ["super", "base"], annotations), masks=True)
    for label, skip in (("super", "FFFF"), ("base", "TTTT")):
        assert before[skip]["box_ap50"] < 2.0 and before[skip]["mask_ap50"] < 2.0, before
        assert log[-1][f"val_box_ap50_{label}"] > 8.0, log[-1]
        assert log[-1][f"val_box_ap_{label}"] > before[skip]["box_ap"] + 1.5, log[-1]
        assert log[-1][f"val_mask_ap50_{label}"] > 6.0, log[-1]

    capsys.readouterr()
    assert (
        main(
            [
                "detect",
                "eval",
                "--checkpoint",
                str(tmp_path / "checkpoint.pt"),
                "--skip",
                "all",
                "--subset",
                "4",
                "--json",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["skip"] for r in rows] == [str(c) for c in adn.SkipConfig.all(4)]
    assert all(r["box_ap"] is not None and r["mask_ap"] is not None for r in rows)
    assert rows[-1]["backbone_macs"] < rows[0]["backbone_macs"] and rows[0]["macs_ratio"] == 1.0


# ----- bad input -------------------------------------------------------------------------------------------------------
def _valid() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12], "segmentation": [[2, 3, 12, 3, 12, 15]]}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


def _without(key):
    return lambda d: d.pop(key)


BAD_FILES = {
    "no annotations list": (_without("annotations"), "lacks the 'annotations' list"),
    "annotation without bbox": (lambda d: d["annotations"][0].pop("bbox"), "annotation 7 lacks 'bbox'"),
    "box outside the image": (
        lambda d: d["annotations"][0].update(bbox=[35, 3, 10, 12]),
        r"annotation 7: bbox \[35, 3, 10, 12\] reaches outside image 1 \(a.png, 40x30",
    ),
    "corner coordinates": (
        lambda d: d["annotations"][0].update(bbox=[20, 10, 38, 29]),
        "looks like \\[x1, y1, x2, y2\\]",
    ),
    "negative width": (lambda d: d["annotations"][0].update(bbox=[20, 10, -3, 5]), "negative width"),
    "unknown category": (lambda d: d["annotations"][0].update(category_id=9), "category_id 9, which is not in"),
    "unknown image": (lambda d: d["annotations"][0].update(image_id=2), "image_id 2, which is not in 'images'"),
    "image without size": (lambda d: d["images"][0].pop("height"), "image 1 lacks 'height'"),
    "duplicate image id": (lambda d: d["images"].append(dict(d["images"][0])), "image id 1 appears twice"),
    "mask model without masks": (lambda d: d["annotations"][0].pop("segmentation"), "has no 'segmentation'"),
    "bad polygon": (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]), "at least 3 points"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_annotation_files_give_clear_errors(tmp_path, case):
    data = _valid()
    mutate, message = BAD_FILES[case]
    mutate(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=message):
        load_annotations(path, need_masks=True)


def test_annotation_errors_reach_the_command_line(tmp_path, capsys):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    data = _valid()
    data["annotations"][0]["bbox"] = [0, 0, 50, 12]
    (tmp_path / "annotations/instances_train2017.json").write_text(json.dumps(data))
    assert main(["detect", "train", "--model", "fasterrcnn_resnet18_fpn", "--data-path", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("adn: error:") and "reaches outside image 1" in error
    assert main(["detect", "train", "--data-path", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_image_that_disagrees_with_its_annotation_is_named(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (41, 30)).save(tmp_path / "images/a.png")
    (tmp_path / "instances.json").write_text(json.dumps(_valid()))
    dataset = CocoDetection(tmp_path / "images", tmp_path / "instances.json", eval_transforms())
    with pytest.raises(adn.errors.DataError, match="a.png is 41x30 pixels but .* says 40x30"):
        dataset[0]


def test_synthetic_data_are_consistent(shapes):
    annotations = load_annotations(shapes / "annotations/instances_train2017.json", need_masks=True)
    assert [c["name"] for c in annotations.categories] == ["rectangle", "ellipse", "triangle"]
    dataset = CocoDetection(shapes / "train2017", annotations, eval_transforms(), masks=True)
    image, target = dataset[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) >= 1
    for box, mask in zip(target["boxes"], target["masks"]):  # each mask lies inside its box
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0].floor() and xs.max() <= box[2].ceil() and ys.min() >= box[1].floor()

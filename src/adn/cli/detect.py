"""``adn detect``: train, evaluate and make data for adaptive depth detectors.

    adn detect make-synthetic --output data/shapes --images 256
    adn detect train --model maskrcnn_resnet18_fpn --data-path data/shapes --epochs 12 ...
    adn detect eval --checkpoint runs/detect/checkpoint.pt --skip all

Registered on adn's parser by :func:`add_detect`; errors are reported by ``adn.cli.main`` (one
``adn: error:`` line, exit status 2)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

from ..utils import jsonout
from ..detection.train import METHODS, OPTIMIZERS, SCHEDULERS, DetectTrainConfig
from ..core.skip import SkipConfig
from .common import positive_int


def add(sub) -> None:
    parser = sub.add_parser(
        "detect",
        help="object detection / instance segmentation with adaptive depth backbones (Faster R-CNN, Mask R-CNN)",
        description="Adaptive depth ResNet-FPN backbones in torchvision's Faster R-CNN and Mask "
        "R-CNN: train (Algorithm 1 on FPN features), evaluate (COCO AP per "
        "sub-network), make a synthetic COCO-format dataset.",
    )
    commands = parser.add_subparsers(dest="detect_command", required=True, metavar="COMMAND")
    _add_make_synthetic(commands)
    _add_train(commands)
    _add_eval(commands)


# ----- make-synthetic ------------------------------------------------------------------------------------------
def _add_make_synthetic(commands) -> None:
    p = commands.add_parser(
        "make-synthetic",
        help="write a small synthetic COCO-format dataset (shapes on textures)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", required=True, help="folder to write (train2017/, val2017/, annotations/)")
    p.add_argument("--images", type=positive_int, default=64, help="training images")
    p.add_argument("--val-images", type=int, default=16, help="validation images")
    p.add_argument("--size", type=positive_int, default=128, help="image height and width in pixels")
    p.add_argument("--max-objects", type=positive_int, default=3, help="objects per image, at most")
    p.add_argument(
        "--object-size",
        type=float,
        nargs=2,
        default=[0.2, 0.45],
        metavar=("MIN", "MAX"),
        help="object extent as a fraction of the image side",
    )
    p.add_argument(
        "--colour-by-class",
        action="store_true",
        help="each class its own colour family on grey backgrounds (easier; for quick CPU runs). "
        "Default: random colours, only the shape tells the class",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images and boxes")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --output folder that holds files other than an earlier synthetic dataset",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_run_make_synthetic)


def _run_make_synthetic(args) -> int:
    from ..detection.synthetic import make_synthetic_coco

    summary = make_synthetic_coco(
        args.output,
        args.images,
        args.val_images,
        args.size,
        args.max_objects,
        args.seed,
        tuple(args.object_size),
        args.colour_by_class,
        overwrite=args.overwrite,
    )
    if args.json:
        print(jsonout.dumps(summary, indent=2))
        return 0
    print(
        f"synthetic COCO-format dataset in {summary['root']}: classes {', '.join(summary['classes'])}, "
        f"{summary['size']}x{summary['size']} pixels"
    )
    for split in ("train", "val"):
        if split in summary:
            s = summary[split]
            print(f"  {split}: {s['images']} images, {s['objects']} objects  ({s['image_dir']}, {s['annotations']})")
    return 0


# ----- train -----------------------------------------------------------------------------------------------------
def _add_train(commands) -> None:
    d = DetectTrainConfig()
    p = commands.add_parser(
        "train",
        help="train a detector with an adaptive depth backbone (Algorithm 1) or a baseline",
        description="Algorithm 1 adapted to detection: super-net detection losses (weight alpha) "
        "and KL between the super-net's and the base-net's FPN features (weight "
        "1 - alpha). Defaults: torchvision's detection reference recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="<fasterrcnn|maskrcnn>_<resnet18|resnet34|resnet50|...>_fpn[_v2]")
    g.add_argument(
        "--backbone-weights",
        default=None,
        help="start the backbone from: an `adn train` checkpoint (ResNet-ADN), a ResNet state_dict file, or "
        "torchvision weights (IMAGENET1K_V1, DEFAULT; downloaded)",
    )
    g.add_argument(
        "--trainable-backbone-layers",
        type=int,
        default=None,
        help="0-5 as torchvision (default: 3 with backbone weights, else 5)",
    )
    g.add_argument(
        "--frozen-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="FrozenBatchNorm2d in the backbone, twins included (default: with backbone weights, v1 models)",
    )
    g.add_argument(
        "--no-skip-aware-norm",
        dest="skip_aware_norm",
        action="store_const",
        const=False,
        default=None,
        help="ablation: no skip-aware norm twins (default: as the backbone checkpoint, else with twins)",
    )
    g.add_argument(
        "--fpn-channels",
        type=positive_int,
        default=d.fpn_channels,
        help="FPN width (256: torchvision); smaller widths shrink RPN and heads for CPU experiments",
    )
    g.add_argument("--min-size", type=positive_int, default=d.min_size, help="shorter image side after resizing")
    g.add_argument("--max-size", type=positive_int, default=d.max_size, help="longer image side at most")
    g.add_argument(
        "--rpn-proposals-train",
        type=positive_int,
        default=d.rpn_proposals_train,
        help="RPN proposals kept per image in training (before and after NMS)",
    )
    g.add_argument(
        "--rpn-proposals-test",
        type=positive_int,
        default=d.rpn_proposals_test,
        help="region proposals kept per image at evaluation",
    )
    g.add_argument(
        "--box-batch-size-per-image",
        type=positive_int,
        default=d.box_batch_size_per_image,
        help="RoIs sampled per image for the box (and mask) head losses",
    )
    g.add_argument(
        "--detections-per-image", type=positive_int, default=d.detections_per_image, help="detections kept per image"
    )
    g = p.add_argument_group("data (COCO format)")
    g.add_argument(
        "--data-path", default=None, help="folder with train2017/, val2017/ and annotations/instances_*.json"
    )
    for split in ("train", "val"):
        g.add_argument(f"--{split}-images", default=None, help=f"{split} image folder (overrides --data-path)")
        g.add_argument(f"--{split}-ann", default=None, help=f"{split} instances JSON (overrides --data-path)")
    g.add_argument("--train-subset", type=positive_int, default=None, help="train on a fixed random subset of N images")
    g.add_argument(
        "--val-subset", type=positive_int, default=None, help="validate on a fixed random subset of N images"
    )
    g.add_argument("--no-hflip", dest="hflip", action="store_false", help="no random horizontal flips")
    g = p.add_argument_group("method")
    g.add_argument(
        "--method",
        default=d.method,
        choices=METHODS,
        help="adn: sub-path specialization; joint: both depths on detection losses, 0.5 each; "
        "individual: one fixed depth (--skip)",
    )
    g.add_argument("--skip", default=d.skip, help="depth trained by --method individual (super, base, TTFF, ...)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="weight of the super-net's detection losses")
    g.add_argument(
        "--temperature", type=float, default=d.temperature, help="distillation temperature (KL scaled by T^2)"
    )
    g.add_argument(
        "--feature-kd",
        default=d.feature_kd,
        choices=("spatial", "pooled"),
        help="FPN distillation: softmax over channels at each position (spatial) or per image (pooled)",
    )
    g.add_argument(
        "--bn-stats-from",
        default=d.bn_stats_from,
        choices=("super", "both"),
        help="which pass updates running statistics of batch norms without a twin",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive_int, default=d.epochs, help="passes over the training images")
    g.add_argument("-b", "--batch-size", type=positive_int, default=d.batch_size, help="images per process and step")
    g.add_argument("-j", "--workers", type=int, default=d.workers, help="data loading processes")
    g.add_argument("--opt", default=d.opt, choices=OPTIMIZERS, help="optimizer")
    g.add_argument("--lr", type=float, default=d.lr, help="0.02 for 16 images per step (torchvision); scale linearly")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum, in [0, 1)")
    g.add_argument(
        "--wd", "--weight-decay", dest="weight_decay", type=float, default=d.weight_decay, help="weight decay"
    )
    g.add_argument("--lr-scheduler", default=d.lr_scheduler, choices=SCHEDULERS, help="learning-rate schedule")
    g.add_argument("--lr-steps", type=int, nargs="+", default=list(d.lr_steps), help="multisteplr milestones (epochs)")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="multisteplr: factor at each milestone")
    g.add_argument("--lr-warmup-iters", type=int, default=d.lr_warmup_iters, help="linear warm-up (within epoch 1)")
    g.add_argument(
        "--lr-warmup-factor",
        type=float,
        default=d.lr_warmup_factor,
        help="learning-rate factor at the start of warm-up",
    )
    g.add_argument(
        "--clip-grad-norm", type=float, default=None, help="clip gradients to this norm (default: no clipping)"
    )
    g.add_argument("--max-steps-per-epoch", type=positive_int, default=None, help="cap steps per epoch (quick runs)")
    g = p.add_argument_group("run (multi-process: torchrun --nproc_per_node=K -m adn detect train ...)")
    g.add_argument("--output-dir", default=d.output_dir, help="where checkpoint.pt and log.jsonl go")
    g.add_argument(
        "--resume",
        default=None,
        help="checkpoint to continue from, at the epoch after the "
        "last one it finished (model settings come from the checkpoint)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace another run's files in --output-dir")
    g.add_argument(
        "--keep-checkpoints",
        "--keep-last",
        dest="keep_checkpoints",
        type=int,
        default=d.keep_checkpoints,
        metavar="K",
        help="keep the last K checkpoints as checkpoint-e<epoch>-s<step>.pt beside checkpoint.pt",
    )
    g.add_argument(
        "--eval-batch-size", type=positive_int, default=d.eval_batch_size, help="images per evaluation batch"
    )
    g.add_argument("--seed", type=int, default=d.seed, help="seed of initialization, data order and augmentation")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    import os

    from ..detection.train import train_detector

    names = {f.name for f in fields(DetectTrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["lr_steps"] = tuple(values["lr_steps"])
    cfg = DetectTrainConfig(**values)
    train_detector(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"checkpoint: {Path(cfg.output_dir) / 'checkpoint.pt'}", file=sys.stderr)
    return 0


# ----- eval ------------------------------------------------------------------------------------------------------
COLUMNS = [  # key, header, format, scale
    ("skip", "skip", "{}", None),
    ("box_ap", "box AP", "{:.1f}", None),
    ("box_ap50", "AP50", "{:.1f}", None),
    ("box_ap75", "AP75", "{:.1f}", None),
    ("mask_ap", "mask AP", "{:.1f}", None),
    ("mask_ap50", "AP50", "{:.1f}", None),
    ("detections", "detections", "{}", None),
    ("backbone_macs", "backbone MACs (G)", "{:.2f}", 1e-9),
    ("macs_ratio", "MACs/super", "{:.3f}", None),
    ("params", "params (M)", "{:.2f}", 1e-6),
]


def _add_eval(commands) -> None:
    p = commands.add_parser(
        "eval",
        help="COCO box AP and mask AP of every sub-network of a detector checkpoint",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="file written by adn detect train")
    p.add_argument(
        "--data-path",
        default=None,
        help="folder with val2017/ and annotations/instances_val2017.json "
        "(default: the validation data it was trained with)",
    )
    p.add_argument("--images", default=None, help="image folder (with --ann-file; overrides --data-path)")
    p.add_argument("--ann-file", default=None, help="instances JSON of those images")
    p.add_argument("--subset", type=positive_int, default=None, help="evaluate on a fixed random subset of N images")
    p.add_argument("--skip", default="all", help="'all', or comma-separated configs such as TTFF,super,base")
    p.add_argument("-b", "--batch-size", type=positive_int, default=2, help="images per evaluation batch")
    p.add_argument("-j", "--workers", type=int, default=0, help="data loading processes (0: in this process)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print JSON rows on stdout instead of a table")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from ..detection.checkpoint import load_detector
    from ..detection.data import CocoDetection, DataError, eval_transforms, find_split, fixed_subset, load_annotations
    from ..detection.evaluate import evaluate_detector

    detector, ckpt = load_detector(args.checkpoint)
    meta = ckpt["meta"]
    images, ann = _eval_files(args, meta.get("config", {}), find_split)
    annotations = load_annotations(ann, need_masks=detector.roi_heads.has_mask())
    ours = [c["id"] for c in meta["categories"]]
    if [c["id"] for c in annotations.categories] != ours:
        raise DataError(
            f"{ann} lists categories {[c['id'] for c in annotations.categories][:10]}..., the checkpoint "
            f"was trained on {ours[:10]}...; evaluate on data with the same category list"
        )
    dataset = fixed_subset(CocoDetection(images, annotations, eval_transforms()), args.subset, 0)
    configs = (
        SkipConfig.all(detector.num_stages)
        if args.skip.strip().lower() == "all"
        else [SkipConfig(part, detector.num_stages) for part in args.skip.split(",")]
    )
    device = torch.device(args.device)
    rows = evaluate_detector(
        detector.to(device),
        dataset,
        annotations,
        configs,
        device,
        args.batch_size,
        args.workers,
        progress=args.progress,
    )
    if args.json:
        print(jsonout.dumps(rows, indent=2))
        return 0
    print(
        f"{meta['model']} ({meta.get('method')}), {len(dataset)} images of {ann}; COCO AP in percent; backbone "
        f"(ResNet + FPN) MACs per image at the detector's input size"
    )
    print(format_table(rows))
    return 0


def _eval_files(args, trained: dict, find_split) -> tuple[str, str]:
    if args.images or args.ann_file:
        if not (args.images and args.ann_file):
            raise ValueError("give both --images and --ann-file (or --data-path)")
        return args.images, args.ann_file
    if args.data_path:
        return find_split(args.data_path, "val")
    if trained.get("val_images") and trained.get("val_ann"):
        return trained["val_images"], trained["val_ann"]
    if trained.get("data_path"):
        return find_split(trained["data_path"], "val")
    raise ValueError("no evaluation data: give --data-path, or --images and --ann-file")


def format_table(rows: list[dict]) -> str:
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    cells = [[c[1] for c in columns]]
    for row in rows:
        cells.append(
            [
                "-" if row.get(key) is None else fmt.format(row[key] * scale if scale else row[key])
                for key, _header, fmt, scale in columns
            ]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)

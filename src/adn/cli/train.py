"""``adn train``: the flags of joint training (the default), Algorithm 1 and the baselines, following torchvision's
reference scripts."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from ..vision.data import AUTO_AUGMENT_POLICIES, DATASETS, INTERPOLATIONS
from ..core.distill import FEATURE_KD_MODES
from ..models import available_models
from ..training.methods import METHODS
from ..training.optim import OPTIMIZERS, SCHEDULERS
from ..vision.train_config import TrainConfig
from .common import positive_int


def add(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an adaptive depth network (joint by default; Algorithm 1: --method adn) or a baseline",
        description="Train an adaptive depth network: by default jointly (both depths on the labels, "
        "skip-aware norms; each depth's own batch-norm statistics are stored at the end), "
        "with the paper's Algorithm 1 (sub-path specialization: --method adn), or an "
        "individual fixed-depth baseline. Flags follow torchvision's reference scripts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = TrainConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help=f"one of: {', '.join(available_models())}")
    g.add_argument("--weights", default=None, help="torchvision weights to start from, e.g. DEFAULT (downloads)")
    g.add_argument(
        "--init-from",
        default=None,
        metavar="FILE",
        help="start from the weights in FILE: a plain network's state dict (.pth/.pt), a .safetensors file, "
        "a timm checkpoint, or an adn checkpoint (twins loaded too unless it is --method individual); "
        "converted after loading; a head with another class count is replaced (docs/fine-tuning.md)",
    )
    g.add_argument("--width", type=positive_int, default=None, help="base width of the small ResNets (default 16)")
    g.add_argument("--data", default=d.data, choices=DATASETS, help="dataset (fake: random images, for smoke tests)")
    g.add_argument("--data-path", default=None, help="dataset folder (imagefolder: with train/ and val/)")
    g.add_argument("--train-subset", type=int, default=None, help="train on a fixed random subset of N images")
    g.add_argument("--val-subset", type=int, default=None, help="validate on a fixed random subset of N images")
    g.add_argument(
        "--val-from-train",
        type=positive_int,
        default=None,
        metavar="N",
        help="validate on N training images held out from training (the same N for every seed) instead "
        "of the test split: choose recipes this way, and keep the test split for final numbers",
    )
    g.add_argument("--train-crop-size", type=positive_int, default=None, help="imagefolder/fake: training crop size")
    g.add_argument("--val-resize-size", type=positive_int, default=None, help="imagefolder: validation resize")
    g.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="imagefolder: skip unreadable image files (named on stderr, counted in the log) instead "
        "of stopping at the first one",
    )
    g = p.add_argument_group("method")
    g.add_argument(
        "--method",
        default=d.method,
        choices=METHODS,
        help="joint: (CE_super+CE_base)/2, both depths on the labels, then each depth's own batch-norm "
        "statistics stored in the checkpoint (the best from scratch in our reproduction: within noise "
        "of networks trained alone, where Algorithm 1 ends 0.74 / 0.59 points behind); adn: sub-path "
        "specialization, the paper's Algorithm 1 (exactly as published with --base-ce 0; recommended "
        "to fine-tune a trained network with --init-from); individual: one fixed sub-network (the "
        "paper's baselines)",
    )
    g.add_argument("--skip", default=d.skip, help="sub-network trained by --method individual (TTFF, super, base)")
    g.add_argument(
        "--no-skip-aware-norm",
        dest="skip_aware_norm",
        action="store_false",
        help="no skip-aware norm twins (the paper's Table 3 ablation). With --method joint, a simpler "
        "alternative to twins plus per-depth statistics: as good on our test set, and every depth "
        "runs well on the running statistics",
    )
    g.add_argument("--alpha", type=float, default=d.alpha, help="weight of the super-net's CE loss")
    g.add_argument("--temperature", type=float, default=d.temperature, help="softmax temperature of the KL terms")
    g.add_argument(
        "--feature-kd",
        default=d.feature_kd,
        choices=FEATURE_KD_MODES,
        help="stage-output distillation: spatial (softmax over channels per position, the paper), "
        "pooled (per image, the authors' code) or none",
    )
    g.add_argument(
        "--base-ce",
        type=float,
        default=d.base_ce,
        metavar="W",
        help="--method adn, a deviation from the paper: also train the base-net on the labels, adding "
        "W * CE(y, y_base) to its distillation loss (0: Algorithm 1 as published). 0.5 closed "
        "Algorithm 1's gap to networks trained alone in our reproduction, with no recalibration needed",
    )
    g.add_argument(
        "--bn-stats-from",
        default="super",
        choices=("super", "both"),
        help="which forward pass updates the running statistics of batch norms that have no "
        "skip-aware twin (stem, shortcut projections): the super-net's only, or both passes",
    )
    g.add_argument(
        "--depth-statistics",
        action=argparse.BooleanOptionalAction,
        default=d.depth_statistics,
        help="when training ends, measure every depth's batch-norm statistics on training images and store "
        "them in the checkpoint, as adn recalibrate does, so that eval, predict, serve and export run "
        "each depth with its own. Default: on for --method joint with skip-aware norms (its depths "
        "never trained explicitly need them), off otherwise (Algorithm 1 stays as published)",
    )
    g.add_argument(
        "--depth-statistics-batches",
        type=positive_int,
        default=d.depth_statistics_batches,
        metavar="N",
        help="training batches of 256 images per depth for --depth-statistics (adn recalibrate's --batches)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs to train (on resume: the total, may be raised)")
    g.add_argument("-b", "--batch-size", type=int, default=d.batch_size, help="images per step (per process)")
    g.add_argument("-j", "--workers", type=int, default=d.workers, help="data loading processes")
    g.add_argument("--opt", default=d.opt, choices=OPTIMIZERS, help="optimizer")
    g.add_argument("--lr", type=float, default=d.lr, help="initial learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum, help="momentum of sgd and rmsprop, in [0, 1)")
    g.add_argument(
        "--wd", "--weight-decay", dest="weight_decay", type=float, default=d.weight_decay, help="weight decay"
    )
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (sgd)")
    g.add_argument(
        "--lr-scheduler",
        default=d.lr_scheduler,
        choices=SCHEDULERS,
        help="learning-rate schedule, stepped once per epoch",
    )
    g.add_argument("--lr-step-size", type=int, default=d.lr_step_size, help="steplr: epochs between decays")
    g.add_argument(
        "--lr-steps",
        type=int,
        nargs="+",
        default=list(d.lr_steps),
        help="multisteplr: the epochs at which the learning rate drops by --lr-gamma (e.g. 15 23)",
    )
    g.add_argument(
        "--lr-gamma",
        type=float,
        default=d.lr_gamma,
        help="steplr/multisteplr/exponentiallr: factor in (0, 1] the learning rate is multiplied by",
    )
    g.add_argument("--lr-min", type=float, default=d.lr_min, help="cosineannealinglr: final learning rate")
    g.add_argument("--lr-warmup-epochs", type=int, default=d.lr_warmup_epochs, help="epochs of warm-up (0: none)")
    g.add_argument(
        "--body-lr-scale",
        type=float,
        default=d.body_lr_scale,
        metavar="F",
        help="fine-tuning: everything but the classification head trains at F x the learning rate "
        "(schedule included), in (0, 1]; the head at the full rate",
    )
    g.add_argument(
        "--lr-warmup-method", default=d.lr_warmup_method, choices=("linear", "constant"), help="warm-up shape"
    )
    g.add_argument(
        "--lr-warmup-decay",
        type=float,
        default=d.lr_warmup_decay,
        help="learning-rate factor at the start of warm-up, in (0, 1]",
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=d.label_smoothing,
        help="label smoothing of the cross-entropy, in [0, 1)",
    )
    g.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm before each update")
    g.add_argument("--norm-weight-decay", type=float, default=None, help="weight decay of norm parameters")
    g.add_argument("--bias-weight-decay", type=float, default=None, help="weight decay of biases")
    g.add_argument(
        "--transformer-embedding-decay",
        type=float,
        default=None,
        help="weight decay of class token, position embeddings and relative position bias tables",
    )
    g.add_argument("--model-ema", action="store_true", help="also keep and evaluate an EMA of the weights")
    g.add_argument("--model-ema-steps", type=int, default=d.model_ema_steps, help="steps between EMA updates")
    g.add_argument("--model-ema-decay", type=float, default=d.model_ema_decay, help="EMA decay per update, in (0, 1)")
    g = p.add_argument_group("augmentation")
    g.add_argument("--mixup-alpha", type=float, default=d.mixup_alpha, help="MixUp on batches (0: off)")
    g.add_argument("--cutmix-alpha", type=float, default=d.cutmix_alpha, help="CutMix on batches (0: off)")
    g.add_argument("--auto-augment", default=None, choices=AUTO_AUGMENT_POLICIES, help="auto-augment policy")
    g.add_argument("--random-erase", type=float, default=d.random_erase, help="random erasing probability")
    g.add_argument("--interpolation", default=d.interpolation, choices=INTERPOLATIONS, help="resize interpolation")
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (quick runs)")
    g.add_argument(
        "--recalibrate-bn",
        type=int,
        default=d.recalibrate_bn,
        metavar="N",
        help="after each epoch, also validate with batch-norm statistics recomputed per depth on N "
        "training batches (logged as val_acc1_<depth>_recal; the checkpoint keeps its own statistics); "
        "0: off",
    )
    g = p.add_argument_group("scale and speed (multi-process: torchrun --nproc_per_node=K -m adn train ...)")
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="with several processes: batch-norm statistics over the global batch, not each process's share",
    )
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision (autocast; float16 + GradScaler on CUDA). Default: on (bfloat16) where the "
        "hardware computes bfloat16 natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs), else off",
    )
    g.add_argument(
        "--amp-dtype",
        default=d.amp_dtype,
        choices=("auto", "float16", "bfloat16"),
        help="autocast type; auto: float16 on CUDA, bfloat16 on CPU",
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory format (faster convolutions). Default: on together with automatic "
        "mixed precision, unless a layer is known to crash in it",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the network (one graph per depth)")
    g.add_argument("--compile-backend", default=d.compile_backend, help="torch.compile backend")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=d.output_dir, help="where checkpoint.pt and log.jsonl go")
    g.add_argument(
        "--resume", default=None, help="checkpoint to continue from (exactly where it stopped, mid-epoch included)"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --output-dir that holds another run's checkpoints and log, deleting them "
        "(without it such a folder is refused)",
    )
    g.add_argument(
        "--save-every-steps",
        type=int,
        default=None,
        metavar="N",
        help="also write a checkpoint every N steps, mid-epoch included (unset: at the end of each epoch only)",
    )
    g.add_argument(
        "--keep-checkpoints",
        "--keep-last",
        dest="keep_checkpoints",
        type=int,
        default=d.keep_checkpoints,
        metavar="K",
        help="keep the last K checkpoints as checkpoint-e<epoch>-s<step>.pt beside checkpoint.pt (the latest)",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="seed of weights, data order and augmentation")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ... (under torchrun: GPU LOCAL_RANK)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(run=run)


def run(args) -> int:
    import os

    from ..vision.stored_statistics import wants_depth_statistics
    from ..vision.train import train

    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    train(cfg)  # (stores the per-depth statistics itself when the run wants them)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the whole run
        checkpoint = Path(cfg.output_dir) / "checkpoint.pt"
        print(f"checkpoint: {checkpoint}", file=sys.stderr)
        # with twins, its depths never trained explicitly need statistics of their own (without, the
        # running averages serve every depth: docs/reproduction.md); told not to measure them, say how
        if cfg.method == "joint" and cfg.skip_aware_norm and not wants_depth_statistics(cfg):
            print(
                f"next: adn recalibrate --checkpoint {checkpoint}   (each depth's own batch-norm statistics, "
                f"stored for eval, predict, serve and export)",
                file=sys.stderr,
            )
    return 0

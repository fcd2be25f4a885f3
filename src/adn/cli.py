"""The ``adn`` command line (also ``python -m adn``): train, eval, profile, export.

Tables go to stdout; with ``--json`` stdout holds only JSON. Progress bars and logs go to stderr.
Errors a user can fix are printed as one ``adn: error: ...`` line with exit status 2."""
from __future__ import annotations

import argparse
import copy
import difflib
import json
import shlex
import sys
from dataclasses import fields
from pathlib import Path

import torch

from . import jsonout
from .checkpoint import CheckpointError
from .data import AUTO_AUGMENT_POLICIES, DATASETS, INTERPOLATIONS, DataError
from .distill import FEATURE_KD_MODES
from .models import available_models
from .skip import SkipConfig
from .train import METHODS, OPTIMIZERS, SCHEDULERS, TrainConfig, TrainingDiverged, TrainingInterrupted


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default, shown once, in words that read right for on/off flags.

    argparse's ArgumentDefaultsHelpFormatter showed nothing for options without a help text (--epochs,
    --lr, ...), "(default: None)" after help that already names the default, and "(default: True)" after
    --no-progress, which reads as if the flag were on."""

    def _format_action(self, action):
        text = _default_text(action)
        help_text = _without_auto_default(action)
        if text and "default" not in (help_text or "").lower():
            help_text = f"{help_text} ({text})" if help_text else f"({text})"
        if help_text != action.help:
            action = copy.copy(action)
            action.help = help_text
        return super()._format_action(action)


def _default_text(action) -> str | None:
    """'default: 10', 'default: off' (for a flag that is off unless given), or None (nothing to show)."""
    if action.help == argparse.SUPPRESS or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        positive = next(o for o in action.option_strings if not o.startswith("--no-"))
        return f"default: {positive if action.default else '--no-' + positive[2:]}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "default: off"  # a store_false flag (--no-x) is off too: x is on unless it is given
    if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return None
    value = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else str(action.default)
    return f"default: {value}".replace("%", "%%")  # help strings are %-formatted


def _without_auto_default(action) -> str | None:
    """Python 3.11's BooleanOptionalAction appends ' (default: %(default)s)' (True/False) by itself."""
    suffix = " (default: %(default)s)"
    if isinstance(action, argparse.BooleanOptionalAction) and action.help and action.help.endswith(suffix):
        return action.help[:-len(suffix)]
    return action.help


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an adaptive depth network (Algorithm 1) or a baseline",
                       description="Train with sub-path specialization (method adn), the joint ablation, or an "
                                   "individual fixed-depth baseline. Flags follow torchvision's reference scripts.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help=f"one of: {', '.join(available_models())}")
    g.add_argument("--weights", default=None, help="torchvision weights to start from, e.g. DEFAULT (downloads)")
    g.add_argument("--width", type=positive_int, default=None, help="base width of the small ResNets (default 16)")
    g.add_argument("--data", default=d.data, choices=DATASETS, help="dataset (fake: random images, for smoke tests)")
    g.add_argument("--data-path", default=None, help="dataset folder (imagefolder: with train/ and val/)")
    g.add_argument("--train-subset", type=int, default=None, help="train on a fixed random subset of N images")
    g.add_argument("--val-subset", type=int, default=None, help="validate on a fixed random subset of N images")
    g.add_argument("--val-from-train", type=positive_int, default=None, metavar="N",
                   help="validate on N training images held out from training (the same N for every seed) instead "
                        "of the test split: choose recipes this way, and keep the test split for final numbers")
    g.add_argument("--train-crop-size", type=positive_int, default=None, help="imagefolder/fake: training crop size")
    g.add_argument("--val-resize-size", type=positive_int, default=None, help="imagefolder: validation resize")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="imagefolder: skip unreadable image files (named on stderr, counted in the log) instead "
                        "of stopping at the first one")
    g = p.add_argument_group("method")
    g.add_argument("--method", default=d.method, choices=METHODS,
                   help="adn: sub-path specialization; joint: (CE_super+CE_base)/2 ablation; individual: one fixed "
                        "sub-network (the paper's baselines)")
    g.add_argument("--skip", default=d.skip, help="sub-network trained by --method individual (TTFF, super, base)")
    g.add_argument("--no-skip-aware-norm", dest="skip_aware_norm", action="store_false",
                   help="ablation: no skip-aware norm twins")
    g.add_argument("--alpha", type=float, default=d.alpha, help="weight of the super-net's CE loss")
    g.add_argument("--temperature", type=float, default=d.temperature, help="softmax temperature of the KL terms")
    g.add_argument("--feature-kd", default=d.feature_kd, choices=FEATURE_KD_MODES,
                   help="stage-output distillation: spatial (softmax over channels per position, the paper), "
                        "pooled (per image, the authors' code) or none")
    g.add_argument("--base-ce", type=float, default=d.base_ce, metavar="W",
                   help="deviation from the paper, for ablations: also train the base-net on the labels, adding "
                        "W * CE(y, y_base) to its distillation loss (0: Algorithm 1 as published)")
    g.add_argument("--bn-stats-from", default="super", choices=("super", "both"),
                   help="which forward pass updates the running statistics of batch norms that have no "
                        "skip-aware twin (stem, shortcut projections): the super-net's only, or both passes")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs to train (on resume: the total, may be raised)")
    g.add_argument("-b", "--batch-size", type=int, default=d.batch_size, help="images per step (per process)")
    g.add_argument("-j", "--workers", type=int, default=d.workers, help="data loading processes")
    g.add_argument("--opt", default=d.opt, choices=OPTIMIZERS, help="optimizer")
    g.add_argument("--lr", type=float, default=d.lr, help="initial learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum, help="momentum of sgd and rmsprop, in [0, 1)")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=d.weight_decay,
                   help="weight decay")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (sgd)")
    g.add_argument("--lr-scheduler", default=d.lr_scheduler, choices=SCHEDULERS,
                   help="learning-rate schedule, stepped once per epoch")
    g.add_argument("--lr-step-size", type=int, default=d.lr_step_size, help="steplr: epochs between decays")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma,
                   help="steplr/exponentiallr: factor in (0, 1] the learning rate is multiplied by")
    g.add_argument("--lr-min", type=float, default=d.lr_min, help="cosineannealinglr: final learning rate")
    g.add_argument("--lr-warmup-epochs", type=int, default=d.lr_warmup_epochs, help="epochs of warm-up (0: none)")
    g.add_argument("--lr-warmup-method", default=d.lr_warmup_method, choices=("linear", "constant"),
                   help="warm-up shape")
    g.add_argument("--lr-warmup-decay", type=float, default=d.lr_warmup_decay,
                   help="learning-rate factor at the start of warm-up, in (0, 1]")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="label smoothing of the cross-entropy, in [0, 1)")
    g.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm before each update")
    g.add_argument("--norm-weight-decay", type=float, default=None, help="weight decay of norm parameters")
    g.add_argument("--bias-weight-decay", type=float, default=None, help="weight decay of biases")
    g.add_argument("--transformer-embedding-decay", type=float, default=None,
                   help="weight decay of class token, position embeddings and relative position bias tables")
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
    g.add_argument("--recalibrate-bn", type=int, default=d.recalibrate_bn, metavar="N",
                   help="after each epoch, also validate with batch-norm statistics recomputed per depth on N "
                        "training batches (logged as val_acc1_<depth>_recal; the checkpoint keeps its own statistics); "
                        "0: off")
    g = p.add_argument_group("scale and speed (multi-process: torchrun --nproc_per_node=K -m adn train ...)")
    g.add_argument("--sync-bn", action="store_true",
                   help="with several processes: batch-norm statistics over the global batch, not each process's share")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (autocast; float16 + GradScaler on CUDA). Default: on (bfloat16) where the "
                        "hardware computes bfloat16 natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs), else off")
    g.add_argument("--amp-dtype", default=d.amp_dtype, choices=("auto", "float16", "bfloat16"),
                   help="autocast type; auto: float16 on CUDA, bfloat16 on CPU")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (faster convolutions). Default: on together with automatic "
                        "mixed precision, unless a layer is known to crash in it")
    g.add_argument("--compile", action="store_true", help="torch.compile the network (one graph per depth)")
    g.add_argument("--compile-backend", default=d.compile_backend, help="torch.compile backend")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=d.output_dir, help="where checkpoint.pt and log.jsonl go")
    g.add_argument("--resume", default=None, help="checkpoint to continue from (exactly where it stopped, "
                                                  "mid-epoch included)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output-dir that holds another run's checkpoints and log, deleting them "
                        "(without it such a folder is refused)")
    g.add_argument("--save-every-steps", type=int, default=None, metavar="N",
                   help="also write a checkpoint every N steps, mid-epoch included (unset: at the end of each epoch only)")
    g.add_argument("--keep-last", type=int, default=d.keep_last, metavar="K",
                   help="keep the last K checkpoints as checkpoint-e<epoch>-s<step>.pt beside checkpoint.pt (the latest)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of weights, data order and augmentation")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ... (under torchrun: GPU LOCAL_RANK)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    import os

    from .train import train
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the whole run
        print(f"checkpoint: {Path(cfg.output_dir) / 'checkpoint.pt'}", file=sys.stderr)
    return 0


def _add_measure_flags(p) -> None:
    p.add_argument("--skip", default="all", help="'all', or comma-separated configs such as TTFF,super,base")
    p.add_argument("--json", action="store_true", help="print JSON rows on stdout instead of a table")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip latency measurement")
    p.add_argument("--latency-batch-size", type=positive_int, default=1, help="batch size of latency measurements")
    p.add_argument("--warmup", type=int, default=3, help="untimed forward passes before timing")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed forward passes (median reported)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--backend", default="eager", choices=("eager", "compile", "onnxruntime"),
                   help="engine for latency: eager PyTorch (switching depth in place), torch.compile or ONNX Runtime "
                        "(every sub-network compiled or exported ahead of time)")


def _configs(text: str, num_stages: int) -> list[SkipConfig]:
    if text.strip().lower() == "all":
        return SkipConfig.all(num_stages)
    # Repeats and aliases ("super" and "FFF") name one sub-network: each is measured once, in order.
    return list(dict.fromkeys(SkipConfig(part, num_stages) for part in text.split(",")))


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, params, MACs and latency of every sub-network of a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="file written by adn train")
    p.add_argument("--data", default=None, choices=DATASETS, help="default: the dataset it was trained on")
    p.add_argument("--data-path", default=None, help="default: the path it was trained with")
    p.add_argument("--val-subset", type=int, default=None, help="evaluate on a fixed random subset of N images")
    p.add_argument("-b", "--batch-size", type=positive_int, default=256)
    p.add_argument("-j", "--workers", type=int, default=0)
    p.add_argument("--recalibrate-bn", type=positive_int, default=None, metavar="N",
                   help="before evaluating each sub-network, recompute its batch-norm statistics on N batches of "
                        "training images (un-augmented, the same for every depth); the checkpoint is not changed")
    p.add_argument("--plot", default=None, help="accuracy-vs-MACs PNG (default: acc_vs_macs.png next to the checkpoint)")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="imagefolder: skip unreadable image files (named on stderr, counted in the output as "
                        "skipped_images) instead of stopping at the first one; accuracy is over the images read")
    _add_measure_flags(p)
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from .checkpoint import load_network
    from .data import calibration_loader, collate_readable_pairs, load_dataset
    from .evaluate import evaluate_subnetworks
    from .report import add_ratios, plot_accuracy_vs_macs

    net, ckpt = load_network(args.checkpoint)
    meta = ckpt["meta"]
    configs = _configs(args.skip, net.num_stages)
    device = torch.device(args.device)
    net.to(device)
    cfg = meta.get("config", {})
    if not (args.data or meta.get("dataset")):
        raise CheckpointError(f"{args.checkpoint} does not say which dataset it was trained on; pass --data")
    # What the checkpoint names is read where it already is; downloads need --data or --data-path from the user.
    data = load_dataset(args.data or meta["dataset"], args.data_path or meta.get("data_path"),
                        val_subset=args.val_subset, seed=cfg.get("seed", 0), augment=False,
                        image_size=cfg.get("train_crop_size"), val_resize_size=cfg.get("val_resize_size"),
                        skip_bad_images=args.skip_bad_images, download=bool(args.data or args.data_path))
    if data.num_classes != meta["num_classes"]:
        raise DataError(f"the dataset has {data.num_classes} classes but the checkpoint predicts {meta['num_classes']}")
    loader, example = _eval_batches(args, data)
    recalibrate = None
    if args.recalibrate_bn:
        recalibrate = (calibration_loader(data.train, args.batch_size, args.recalibrate_bn, args.workers,
                                          collate_readable_pairs if args.skip_bad_images else None),
                       args.recalibrate_bn)
    example = example[None].expand(args.latency_batch_size, -1, -1, -1).contiguous().to(device)
    rows = add_ratios(evaluate_subnetworks(net, loader, configs, example, device=device, latency=args.latency,
                                           warmup=args.warmup, repeats=args.repeats, backend=args.backend,
                                           recalibrate=recalibrate))
    for row in rows:
        row["recalibrated_bn_batches"] = args.recalibrate_bn or 0
        if args.skip_bad_images:
            row["skipped_images"] = getattr(loader, "skipped", 0)
    _print_eval(args, rows, meta, data, device)
    if not args.no_plot:  # after the results are out: a plot that cannot be written must not lose them
        path = Path(args.plot) if args.plot else Path(args.checkpoint).parent / "acc_vs_macs.png"
        _write_plot(lambda: plot_accuracy_vs_macs(rows, path, title=f"{meta['model']}-ADN on "
                                                                   f"{data.description.split(' (')[0]}"), path)
    return 0


def _eval_batches(args, data):
    """The validation batches of ``adn eval`` and one image for latency. With --skip-bad-images the
    batches count what they skip (``loader.skipped``, reported with the results)."""
    from torch.utils.data import DataLoader

    from .data import ReadableBatches, collate_readable, eval_loader, first_readable
    loader = eval_loader(data.val, args.batch_size, args.workers, collate_readable if args.skip_bad_images else None)
    if not args.skip_bad_images or not isinstance(loader, DataLoader):  # in memory: no image files to skip
        return loader, data.val[0][0]
    return ReadableBatches(loader), first_readable(data.val)[0]


def _write_plot(write, path: Path) -> None:
    """Write a plot; failing to is a warning (the numbers are already printed), not an error."""
    try:
        write()
    except OSError as error:
        reason = ("a file is in the way of its folder" if isinstance(error, (FileExistsError, NotADirectoryError))
                  else error.strerror or str(error))
        print(f"adn: warning: could not write the plot {path} ({reason}); the results above are complete. "
              f"Choose a writable place with --plot, or --no-plot", file=sys.stderr)
        return
    print(f"plot: {path}", file=sys.stderr)


def _print_eval(args, rows: list[dict], meta: dict, data, device) -> None:
    from .report import format_table
    if args.json:
        print(jsonout.dumps(rows, indent=2))
    else:
        skipped = rows[0].get("skipped_images", 0) if rows else 0
        count = f"{len(data.val) - skipped} of {len(data.val)}" if skipped else f"{len(data.val)}"
        print(f"{meta['model']} ({meta['method']}), {count} {data.description.split(' (')[0]} validation images"
              + (f" ({skipped} unreadable, skipped)" if skipped else "") + "; MACs per image"
              + (f"; latency: median of {args.repeats} runs, batch {args.latency_batch_size}, "
                 f"{torch.get_num_threads()} threads, {device}, {args.backend}" if args.latency else "")
              + (f"; batch-norm statistics recalibrated per sub-network on {args.recalibrate_bn} training batches"
                 if args.recalibrate_bn else ""))
        print(format_table(rows))
    sys.stdout.flush()


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="params, MACs and latency of every sub-network of a freshly converted model "
                                       "or of a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help=f"one of: {', '.join(available_models())}")
    p.add_argument("--checkpoint", default=None,
                   help="profile the network of a checkpoint written by adn train instead of --model (its input "
                        "size, channels, classes and width come from the checkpoint)")
    p.add_argument("--input-size", type=positive_int, default=None, help="image height and width (default: 224, "
                                                                          "or the checkpoint's)")
    p.add_argument("--in-channels", type=positive_int, default=None, help="default: 3, or the checkpoint's")
    p.add_argument("--num-classes", type=positive_int, default=None, help="default: 1000, or the checkpoint's")
    p.add_argument("--width", type=positive_int, default=None, help="base width of the small ResNets")
    p.add_argument("--no-skip-aware-norm", dest="skip_aware_norm", action="store_false")
    _add_measure_flags(p)
    p.set_defaults(run=_run_profile)


def _check_input_fits(net, image: torch.Tensor, args) -> None:
    """One forward pass first, so that an input size the model cannot take is named as such."""
    try:
        with torch.no_grad():
            net(image)
    except (RuntimeError, AssertionError, ValueError) as error:
        if _out_of_memory(error):
            raise
        raise ValueError(f"{args.model} cannot process {args.in_channels}x{args.input_size}x{args.input_size} images "
                         f"({_first_line(error)}); give the --input-size and --in-channels it takes (torchvision ViT "
                         f"and Swin: 224 and 3, Swin V2: 256)") from error


def _run_profile(args) -> int:
    from .convert import convert
    from .models import build_model
    from .profile import profile_subnetworks
    from .report import add_ratios, format_table

    if (args.model is None) == (args.checkpoint is None):
        raise ValueError("give either --model NAME (a freshly converted model) or --checkpoint FILE (a trained one)")
    if args.checkpoint:
        from .checkpoint import load_network
        given = [flag for flag, value in (("--num-classes", args.num_classes), ("--in-channels", args.in_channels),
                                          ("--width", args.width)) if value is not None]
        if given or not args.skip_aware_norm:
            raise ValueError(f"{', '.join(given) or '--no-skip-aware-norm'}: the checkpoint fixes the network; "
                             f"drop the flag (only --input-size may be changed)")
        net, ckpt = load_network(args.checkpoint)
        meta = ckpt["meta"]
        args.model, args.in_channels = meta["model"], meta["in_channels"]
        args.input_size = args.input_size or meta.get("image_size") or 224
    else:
        args.input_size, args.in_channels = args.input_size or 224, args.in_channels or 3
        kwargs = {"width": args.width} if args.width else {}
        try:
            net = convert(build_model(args.model, num_classes=args.num_classes or 1000, in_channels=args.in_channels,
                                      **kwargs), skip_aware_norm=args.skip_aware_norm)
        except TypeError as error:  # a model family adn cannot convert (the message lists those it can)
            raise ValueError(f"--model {args.model}: {error}") from error
    configs = _configs(args.skip, net.num_stages)
    device = torch.device(args.device)
    net.to(device).eval()
    example = torch.randn(args.latency_batch_size, args.in_channels, args.input_size, args.input_size, device=device)
    _check_input_fits(net, example[:1], args)
    rows = add_ratios(profile_subnetworks(net, example, configs, latency=args.latency, warmup=args.warmup,
                                          repeats=args.repeats, backend=args.backend))
    if args.json:
        print(jsonout.dumps(rows, indent=2))
    else:
        print(f"{args.model}-ADN, input {args.in_channels}x{args.input_size}x{args.input_size}; MACs per image"
              + (f"; latency: median of {args.repeats} runs, batch {args.latency_batch_size}, "
                 f"{torch.get_num_threads()} threads, {device}, {args.backend}" if args.latency else ""))
        print(format_table(rows))
    return 0


def _add_export(sub) -> None:
    from .export import FORMATS
    p = sub.add_parser("export", help="write standalone sub-networks (one file each) and a manifest",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--skip", default="all", help="'all', or comma-separated configs such as TTFF,base")
    p.add_argument("--format", default="safetensors", choices=FORMATS)
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--accuracy", default=None, help="JSON from `adn eval --json` to record accuracy in the manifest")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from .checkpoint import load_network
    from .export import export_subnetworks

    net, ckpt = load_network(args.checkpoint)
    meta = ckpt["meta"]
    configs = _configs(args.skip, net.num_stages)
    accuracy = None
    if args.accuracy:
        try:
            accuracy = {r["skip"]: {"acc1": r["acc1"], "acc5": r["acc5"]} for r in json.loads(Path(args.accuracy).read_text())}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"--accuracy {args.accuracy}: expected the JSON printed by `adn eval --json` ({error})") from error
    size = meta.get("image_size", 224)
    example = torch.randn(1, meta["in_channels"], size, size)
    entries = export_subnetworks(net.eval(), configs, args.output, args.format, example, accuracy)
    for entry in entries:
        print(f"{entry['skip']}  {Path(args.output) / entry['file']}")
    return 0


def _add_pareto(sub) -> None:
    p = sub.add_parser("pareto", help="Pareto-optimal sub-networks from `adn eval --json` (and `adn profile --json`)",
                       description="Reads the JSON rows of `adn eval --json` (accuracy) and optionally of "
                                   "`adn profile --json` (latency measured elsewhere, e.g. on the target device), "
                                   "prints the sub-networks no other beats on both accuracy and cost, and plots "
                                   "accuracy against MACs and latency.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--eval", default=None, dest="eval_json", help="file with the output of adn eval --json")
    p.add_argument("--profile", default=None, dest="profile_json",
                   help="file with the output of adn profile --json; its latency replaces eval's")
    p.add_argument("--cost", default=None, choices=("latency_ms", "macs"),
                   help="cost to rank by (default: latency when measured, else MACs)")
    p.add_argument("--plot", default="pareto.png", help="PNG to write")
    p.add_argument("--json", action="store_true", help="print the Pareto-optimal rows as JSON")
    g = p.add_argument_group("which depth for a latency budget (reads a depth table instead of --eval)")
    g.add_argument("--budget-ms", type=float, default=None, metavar="B",
                   help="print the most accurate depth whose latency at --batch-size fits B ms")
    g.add_argument("--table", default=None, help="depth table written by adn depth-table")
    g.add_argument("--batch-size", type=positive_int, default=1, help="batch size the budget is for")
    g.add_argument("--quantile", default="p99", choices=("p50", "p99"), help="latency quantile that must fit")
    p.set_defaults(run=_run_pareto)


def _read_rows(path: str, what: str, needed: set[str]) -> dict[str, dict]:
    try:
        rows = json.loads(Path(path).read_text())
        by_skip = {row["skip"]: row for row in rows}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: expected the JSON printed by `adn {what} --json` ({error})") from error
    missing = needed - set(next(iter(by_skip.values()), {}))
    if not by_skip or missing:
        raise ValueError(f"{path}: rows lack {sorted(missing) or 'everything'}; produce it with `adn {what} --json`")
    return by_skip


def _run_pareto(args) -> int:
    from .report import format_table, pareto_front, plot_pareto

    if args.budget_ms is not None or args.table:
        return _run_budget(args)
    if not args.eval_json:
        raise ValueError("give --eval eval.json (the Pareto front), or --table depth_table.json --budget-ms B "
                         "(which depth for a budget)")
    rows = _read_rows(args.eval_json, "eval", {"skip", "acc1", "macs"})
    if args.profile_json:
        profile = _read_rows(args.profile_json, "profile", {"skip", "latency_ms"})
        unknown = sorted(set(rows) - set(profile))
        if unknown:
            raise ValueError(f"{args.profile_json} has no row for sub-network(s) {unknown} of {args.eval_json}")
        for skip, row in rows.items():
            row.update({k: v for k, v in profile[skip].items() if k.startswith("latency") or k in ("batch_size", "threads", "device")})
    merged = list(rows.values())
    cost = args.cost or ("latency_ms" if all("latency_ms" in r for r in merged) else "macs")
    if any(cost not in r for r in merged):
        raise ValueError(f"--cost {cost}: not every row has it; give --profile or use --cost macs")
    front = pareto_front(merged, cost)
    if args.json:
        print(jsonout.dumps(front, indent=2))
    else:
        print(f"{len(front)} of {len(merged)} sub-networks are Pareto-optimal in accuracy vs {cost}:")
        print(format_table(front))
    sys.stdout.flush()
    _write_plot(lambda: plot_pareto(merged, args.plot), Path(args.plot))
    return 0


def _run_budget(args) -> int:
    """adn pareto --table T --budget-ms B: the most accurate depth that fits, or the fastest when none does."""
    from .depth_table import DepthTable

    if not args.table or args.budget_ms is None:
        raise ValueError("--budget-ms and --table go together: adn pareto --table depth_table.json --budget-ms B "
                         "[--batch-size N] (write the table with adn depth-table)")
    if not args.budget_ms > 0:
        raise ValueError(f"--budget-ms {args.budget_ms}: give a positive number of milliseconds")
    table = DepthTable.load(args.table)
    answer = table.choose(args.budget_ms, args.batch_size, args.quantile)
    if args.json:
        print(jsonout.dumps(answer, indent=2))
        return 0
    where = f"batch {args.batch_size}, {args.quantile}"
    if answer["fits"]:
        print(f"{answer['skip']}: acc@1 {answer['acc1']:.2f} %, {answer['predicted_ms']:.3f} ms ({where}) "
              f"fits {args.budget_ms:g} ms")
    else:
        print(f"none fits {args.budget_ms:g} ms ({where}); the fastest is {answer['skip']} at "
              f"{answer['predicted_ms']:.3f} ms (acc@1 {answer['acc1']:.2f} %): raise the budget, lower the batch "
              f"size, or shed load")
    return 0


def _batch_size_list(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,8,32, got {text!r}")
    return sizes


def _add_depth_table(sub) -> None:
    from .depth_table import DEFAULT_BATCH_SIZES
    p = sub.add_parser("depth-table", help="latency (p50, p99) of the Pareto-optimal depths at several batch sizes, "
                                           "with their accuracy: the table adn.Governor and adn pareto --budget-ms read",
                       description="Times every depth of `adn eval --json` on this machine at each batch size "
                                   "(interleaved rounds), keeps the depths on the accuracy-vs-latency Pareto front at "
                                   "some batch size, and writes them as plain JSON (schema: docs/serving.md).")
    p.add_argument("--checkpoint", required=True, help="file written by adn train")
    p.add_argument("--eval", required=True, dest="eval_json", help="file with the output of adn eval --json (acc1)")
    p.add_argument("--backend", default="eager", choices=("eager", "onnxruntime"), help="engine that will serve")
    p.add_argument("--batch-sizes", type=_batch_size_list, default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                   help="comma-separated batch sizes to time, e.g. 1,8,32")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds per batch size")
    p.add_argument("--repeats", type=positive_int, default=100,
                   help="timed rounds per batch size; p99 is by nearest rank, so below 100 it is the slowest run")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--output", default=None, help="JSON to write (default: depth_table.json next to the checkpoint)")
    p.set_defaults(run=_run_depth_table)


def _run_depth_table(args) -> int:
    from .atomic import atomic_write
    from .checkpoint import load_network
    from .depth_table import FORMAT, VERSION, DepthTable, conditions, dumps, front, measure_latencies

    net, ckpt = load_network(args.checkpoint)
    meta = ckpt["meta"]
    rows = _read_rows(args.eval_json, "eval", {"skip", "acc1", "macs"})
    try:
        configs = [SkipConfig(skip, net.num_stages) for skip in rows]
    except ValueError as error:
        raise ValueError(f"--eval {args.eval_json} is not of this checkpoint's network: {error}") from error
    device = torch.device(args.device)
    net.to(device)
    size = meta.get("image_size") or 224
    image = torch.randn(meta["in_channels"], size, size, device=device)  # content does not change the time
    latencies = measure_latencies(net, image, configs, args.batch_sizes, args.backend, args.warmup, args.repeats)
    measured = [{"skip": str(c), "acc1": rows[str(c)]["acc1"], "macs": rows[str(c)]["macs"], "latency_ms": lat}
                for c, lat in zip(configs, latencies)]
    table = {"format": FORMAT, "version": VERSION, "model": meta["model"], "checkpoint": Path(args.checkpoint).name,
             "input": [meta["in_channels"], size, size],
             "conditions": conditions(device, args.backend, args.warmup, args.repeats),
             "batch_sizes": args.batch_sizes, "depths": front(measured, args.batch_sizes)}
    DepthTable.from_dict(table, source="the new depth table")  # what is written must read back
    output = Path(args.output) if args.output else Path(args.checkpoint).parent / "depth_table.json"
    atomic_write(output, lambda tmp: Path(tmp).write_text(dumps(table)))
    _print_depth_table(table, len(measured))
    print(f"depth table: {output}", file=sys.stderr)
    return 0


def _print_depth_table(table: dict, measured: int) -> None:
    c = table["conditions"]
    print(f"{len(table['depths'])} of {measured} depths on the Pareto front; latency ms p50/p99 over {c['repeats']} "
          f"rounds, {c['threads']} threads, {c['device']}, {c['backend']}")
    sizes = table["batch_sizes"]
    print("skip  acc@1 %  MACs (M)  " + "  ".join(f"{'batch ' + str(b):>15}" for b in sizes))
    for row in reversed(table["depths"]):  # most accurate first
        cells = "  ".join(f"{row['latency_ms'][str(b)]['p50']:>7.3f}/{row['latency_ms'][str(b)]['p99']:<7.3f}"
                          for b in sizes)
        print(f"{row['skip']:>4}  {row['acc1']:7.2f}  {row['macs'] / 1e6:8.2f}  {cells}")


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="look inside a trained network: skip-aware norm distances, Grad-CAM maps",
                       description="Writes norm_distance.png/.json (how far each skip-aware norm's running mean is "
                                   "from its twin's) and gradcam.png (Grad-CAM after each block of a stage, at the "
                                   "super-net and base-net depths), plus summary.json, into --output.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="file written by adn train")
    p.add_argument("--output", required=True, help="folder for the PNGs and summary.json")
    p.add_argument("--norm-distance", action="store_true", help="compute the norm-distance chart")
    p.add_argument("--gradcam", nargs="*", default=None, metavar="IMAGE",
                   help="Grad-CAM maps for these image files; with no file, the first validation images of "
                        "different classes")
    p.add_argument("--gradcam-count", type=positive_int, default=4, help="validation images used when no file is given")
    p.add_argument("--stage", type=int, default=-1, help="stage whose blocks Grad-CAM visualizes (0-based; -1: last)")
    p.add_argument("--skip", default="super,base", help="comma-separated depths shown in the Grad-CAM figure")
    p.set_defaults(run=_run_analyze)


def _load_images(paths: list[str], meta: dict) -> torch.Tensor:
    """Image files as the network's validation transform would give them (size, channels, normalization)."""
    from PIL import Image
    from torchvision.transforms import v2

    from .data import read_image

    size = meta.get("image_size") or 224
    transform = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(meta["mean"], meta["std"])])
    images = []
    for path in paths:
        try:
            images.append(transform(read_image(path, "L" if meta["in_channels"] == 1 else "RGB")))
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # what PIL raises for bad files
            raise ValueError(f"--gradcam {path}: cannot read it as an image ({error}); give PNG or JPEG files") from error
    return torch.stack(images)


def _run_analyze(args) -> int:
    from .analyze import (cam_statistics, first_image_per_class, gradcam, norm_distances, plot_gradcam,
                          plot_norm_distances, summarize_norm_distances)
    from .atomic import atomic_write
    from .checkpoint import load_network

    if not args.norm_distance and args.gradcam is None:
        raise ValueError("nothing to do: give --norm-distance and/or --gradcam [IMAGE ...]")
    net, ckpt = load_network(args.checkpoint)
    meta = ckpt["meta"]
    output = Path(args.output)
    summary: dict = {"checkpoint": str(args.checkpoint)}
    if args.norm_distance:
        rows = norm_distances(net)
        plot_norm_distances({f"{meta['model']} ({meta['method']})": rows}, output / "norm_distance.png")
        atomic_write(output / "norm_distance.json", lambda tmp: Path(tmp).write_text(jsonout.dumps(rows, indent=1)))
        summary["norm_distance"] = summarize_norm_distances(rows)
        print(f"norm distances: {output / 'norm_distance.png'}, {output / 'norm_distance.json'}", file=sys.stderr)
    if args.gradcam is not None:
        if args.gradcam:
            images = _load_images(args.gradcam, meta)
        else:
            from .data import load_dataset
            data = load_dataset(meta["dataset"], meta.get("data_path"), augment=False, download=False)
            images = first_image_per_class(data.val, args.gradcam_count)
        stage = args.stage % net.num_stages if -net.num_stages <= args.stage < net.num_stages else args.stage
        maps = {f"skip {config}": gradcam(net, images, stage, config) for config in _configs(args.skip, net.num_stages)}
        plot_gradcam(images, maps, output / "gradcam.png", mean=meta["mean"], std=meta["std"],
                     title=f"Grad-CAM after each block of stage {stage + 1}")
        summary["gradcam"] = {"stage": stage, "images": len(images),
                              "hot_fraction": {k: cam_statistics(v) for k, v in maps.items()}}
        print(f"Grad-CAM: {output / 'gradcam.png'}", file=sys.stderr)
    atomic_write(output / "summary.json", lambda tmp: Path(tmp).write_text(jsonout.dumps(summary, indent=1)))
    print(jsonout.dumps(summary, indent=1))
    return 0


def _add_import_weights(sub) -> None:
    from .authors import ARCHITECTURES, ENTRIES
    p = sub.add_parser("import-weights", help="turn the ADN weights the paper's authors published into an adn checkpoint",
                       description="Reads the authors' .pth file (weights only: no code in it runs), renames its keys "
                                   "to ours, checks that every key and shape fits, and writes an adn checkpoint that "
                                   "eval, profile --checkpoint, export, analyze and adn.load read.")
    p.add_argument("file", metavar="FILE", help="the authors' .pth file: a state dict, or a training file holding "
                                                "'model' and/or 'model_ema'")
    p.add_argument("--from", dest="source_format", default="authors", choices=("authors",),
                   help="who wrote FILE (only the paper's authors' layout so far)")
    p.add_argument("--model", required=True, choices=ARCHITECTURES, help="the architecture FILE holds")
    p.add_argument("--output", required=True, help="adn checkpoint to write (replaced atomically)")
    p.add_argument("--which", default=None, choices=ENTRIES,
                   help="in a training file, the state dict to import (default: model when present, else model_ema)")
    p.set_defaults(run=_run_import_weights)


def _run_import_weights(args) -> int:
    from .authors import import_authors_weights

    net = import_authors_weights(args.file, args.model, output=args.output, which=args.which)
    print(f"{args.model}-ADN with the authors' weights from {args.file} ({net.num_stages} stages, "
          f"{2 ** net.num_stages} sub-networks): {args.output}", file=sys.stderr)
    print(f"evaluate: adn eval --checkpoint {shlex.quote(str(args.output))} --data imagefolder --data-path DIR",
          file=sys.stderr)
    return 0


def _add_reproduce(sub) -> None:
    from .reproduce import ARMS
    p = sub.add_parser("reproduce", help="rerun the paper's claims at small scale and write docs/reproduction.md",
                       description="Trains every arm of the reproduction (ADN, the ablations, individual networks, "
                                   "pooled feature KD) for several seeds with adn train and adn eval, then writes the "
                                   "tables, figures and verdicts. Finished runs are cached (checkpoints in --runs; "
                                   "result.json and log.jsonl also in --record, kept in version control), so an "
                                   "interrupted reproduction continues where it stopped, on this machine or another.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", default="runs/reproduce", help="folder for the runs' checkpoints (the cache)")
    p.add_argument("--docs", default="docs/reproduction.md", help="report to write; figures go in a folder beside it")
    p.add_argument("--record", default=None,
                   help="folder for each finished run's result.json and log.jsonl (default: runs/ in the figures folder)")
    p.add_argument("--quick", action="store_true", help="a few steps per arm: checks the harness, not the claims")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds per arm (default 0 1 2; quick: 0 1)")
    p.add_argument("--arms", nargs="+", default=None, choices=list(ARMS), metavar="ARM",
                   help=f"train only these arms (with --train-only; the report needs all): {', '.join(ARMS)}")
    p.add_argument("--data-path", default=None, help="Fashion-MNIST folder (default: the Debian package or a download)")
    p.add_argument("--device", default=None, help="training device (default: a GPU if there is one, else the CPU)")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="runs trained at once, each in its own process with one thread (2 on a 2-core machine)")
    p.add_argument("--train-only", action="store_true", help="train and evaluate the arms, write no report")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train nothing")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (with --jobs 1)")
    p.set_defaults(run=_run_reproduce)


def _run_reproduce(args) -> int:
    from .reproduce import Protocol, reproduce

    protocol = Protocol.quick() if args.quick else Protocol()
    protocol.data_path = args.data_path
    protocol.device = args.device
    if args.train_only and args.report_only:
        raise ValueError("--train-only and --report-only exclude each other")
    if args.seeds:
        if len(args.seeds) < 2 and not args.train_only:
            raise ValueError("--seeds needs at least 2 seeds for a report: the verdicts compare differences with the "
                             "spread across seeds (or add --train-only)")
        protocol.seeds = tuple(args.seeds)
    if args.arms and not args.train_only:
        raise ValueError("--arms trains part of the protocol: add --train-only (the report needs every arm)")
    report = reproduce(protocol, Path(args.runs), Path(args.docs), record=Path(args.record) if args.record else None,
                       quick=args.quick, train_only=args.train_only, report_only=args.report_only, jobs=args.jobs,
                       arms=args.arms,
                       log=lambda message: print(message, file=sys.stderr, flush=True))
    if report:
        print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adn", description="Adaptive depth networks: convert, train, evaluate, "
                                     "profile and export networks whose depth switches at run time.")
    parser.add_argument("--version", action="version", version=f"adn {__import__('adn').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_profile(sub)
    _add_export(sub)
    _add_pareto(sub)
    _add_depth_table(sub)
    _add_analyze(sub)
    _add_import_weights(sub)
    _add_reproduce(sub)
    from .detection.cli import add_detect; add_detect(sub)  # noqa: E702  (adn detect ...)
    for command in _all_parsers(parser):  # one formatter everywhere, adn detect's commands included
        command.formatter_class = HelpFormatter
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for child in dict.fromkeys(_subcommands(parser).values()):  # (aliases map to the same parser)
        found += _all_parsers(child)
    return found


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args`` whose unknown options are reported by the (sub)command they were given to,
    with its usage and the closest option names: argparse reports them at the top level, with the
    top-level usage and no suggestion."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser
        for token in argv:  # the innermost command named on the line (adn detect train ...)
            command = _subcommands(command).get(token, command)
        options = [o for a in command._actions for o in a.option_strings]
        hints = []
        for token in unknown:
            if token.startswith("-"):
                close = difflib.get_close_matches(token.split("=", 1)[0], options, n=2, cutoff=0.6)
                if close:
                    hints.append(f"{token}: did you mean {' or '.join(close)}?")
        command.error(f"unrecognized arguments: {' '.join(unknown)}" + ("; " + "; ".join(hints) if hints else ""))
    return args


def _resume_command(argv: list[str], checkpoint) -> str:
    """The command line that continues an interrupted run: the same one, resuming from its checkpoint."""
    kept, skip_next = [], False
    for token in argv:
        if skip_next:
            skip_next = False
        elif token == "--resume":
            skip_next = True
        elif not token.startswith(("--resume=", "--overwrite")):
            kept.append(token)
    return "adn " + shlex.join([*kept, "--resume", str(checkpoint)])


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parse(parser, argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except TrainingInterrupted as stop:
        print(f"adn: interrupted: {stop}. Continue with: {_resume_command(argv, stop.checkpoint)}", file=sys.stderr)
        return 128 + stop.signum
    except (ValueError, CheckpointError, DataError, TrainingDiverged) as error:
        print(f"adn: error: {error}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        print(f"adn: error: out of memory ({_first_line(error)}); use a smaller batch size (-b), image size, "
              f"model or --width", file=sys.stderr)
        return 2
    except OSError as error:  # a path that cannot be read or written (a file where a folder is expected, ...)
        if isinstance(error, (FileExistsError, NotADirectoryError)) and error.filename:
            print(f"adn: error: a folder is needed at {error.filename} (or above it), but a file is there; "
                  f"choose another path", file=sys.stderr)
        else:
            where = f" {error.filename}" if error.filename else ""
            print(f"adn: error: cannot use{where}: {error.strerror or error}; check the paths given", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

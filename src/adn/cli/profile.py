"""``adn profile``: params, MACs and latency of every sub-network, of a fresh model or a checkpoint."""

from __future__ import annotations

import argparse

import torch

from ..utils import jsonout
from ..models import available_models
from ..errors import first_line
from .common import add_measure_flags, out_of_memory, positive_int, skip_configs


def add(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="params, MACs and latency of every sub-network of a freshly converted model or of a checkpoint",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help=f"one of: {', '.join(available_models())}")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="profile the network of a checkpoint written by adn train instead of --model (its input "
        "size, channels, classes and width come from the checkpoint)",
    )
    p.add_argument(
        "--input-size",
        type=positive_int,
        default=None,
        help="image height and width (default: 224, or the checkpoint's)",
    )
    p.add_argument("--in-channels", type=positive_int, default=None, help="default: 3, or the checkpoint's")
    p.add_argument("--num-classes", type=positive_int, default=None, help="default: 1000, or the checkpoint's")
    p.add_argument("--width", type=positive_int, default=None, help="base width of the small ResNets")
    p.add_argument(
        "--no-skip-aware-norm",
        dest="skip_aware_norm",
        action="store_false",
        help="convert without skip-aware norm twins (the ablation)",
    )
    add_measure_flags(p)
    p.set_defaults(run=run)


def _check_input_fits(net, image: torch.Tensor, args) -> None:
    """One forward pass first, so that an input size the model cannot take is named as such."""
    try:
        with torch.no_grad():
            net(image)
    except (RuntimeError, AssertionError, ValueError) as error:
        if out_of_memory(error):
            raise
        raise ValueError(
            f"{args.model} cannot process {args.in_channels}x{args.input_size}x{args.input_size} images "
            f"({first_line(error)}); give the --input-size and --in-channels it takes (torchvision ViT "
            f"and Swin: 224 and 3, Swin V2: 256)"
        ) from error


def run(args) -> int:
    from ..convert import convert
    from ..models import build_model
    from ..runtime.profile import profile_subnetworks
    from ..deploy.report import add_ratios, format_table

    if (args.model is None) == (args.checkpoint is None):
        raise ValueError("give either --model NAME (a freshly converted model) or --checkpoint FILE (a trained one)")
    if args.checkpoint:
        from ..vision.checkpoint import load_network

        given = [
            flag
            for flag, value in (
                ("--num-classes", args.num_classes),
                ("--in-channels", args.in_channels),
                ("--width", args.width),
            )
            if value is not None
        ]
        if given or not args.skip_aware_norm:
            raise ValueError(
                f"{', '.join(given) or '--no-skip-aware-norm'}: the checkpoint fixes the network; "
                f"drop the flag (only --input-size may be changed)"
            )
        net, ckpt = load_network(args.checkpoint)
        meta = ckpt["meta"]
        args.model, args.in_channels = meta["model"], meta["in_channels"]
        args.input_size = args.input_size or meta.get("image_size") or 224
    else:
        args.input_size, args.in_channels = args.input_size or 224, args.in_channels or 3
        kwargs = {"width": args.width} if args.width else {}
        try:
            net = convert(
                build_model(args.model, num_classes=args.num_classes or 1000, in_channels=args.in_channels, **kwargs),
                skip_aware_norm=args.skip_aware_norm,
            )
        except TypeError as error:  # a model family adn cannot convert (the message lists those it can)
            raise ValueError(f"--model {args.model}: {error}") from error
    configs = skip_configs(args.skip, net.num_stages)
    device = torch.device(args.device)
    net.to(device).eval()
    example = torch.randn(args.latency_batch_size, args.in_channels, args.input_size, args.input_size, device=device)
    _check_input_fits(net, example[:1], args)
    rows = add_ratios(
        profile_subnetworks(
            net, example, configs, latency=args.latency, warmup=args.warmup, repeats=args.repeats, backend=args.backend
        )
    )
    if args.json:
        print(jsonout.dumps(rows, indent=2))
    else:
        print(
            f"{args.model}-ADN, input {args.in_channels}x{args.input_size}x{args.input_size}; MACs per image"
            + (
                f"; latency: median of {args.repeats} runs, batch {args.latency_batch_size}, "
                f"{torch.get_num_threads()} threads, {device}, {args.backend}"
                if args.latency
                else ""
            )
        )
        print(format_table(rows))
    return 0

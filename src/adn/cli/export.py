"""``adn export``: standalone sub-networks, one file each, or one switchable file for every depth, and a manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..utils import jsonout
from .common import note_missing_depth_statistics, skip_configs


def add(sub) -> None:
    from ..deploy.export import FORMATS

    p = sub.add_parser(
        "export",
        help="write standalone sub-networks (one file each, or one switchable file for every depth) and a manifest",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Per-depth files (default): one file per sub-network, each the fastest way to run "
        "its depth (batch norms folded into the convolutions), 2^N copies of the shared "
        "weights on disk and in memory; best for one or a few fixed depths. --switchable "
        "(onnx, pt2): one file with the weights once and the depth chosen per call by "
        "its 'skip' input (every depth, memory about one network's, one session), at a "
        "latency cost (ResNet-50 in ONNX Runtime, 1 thread: 1.1-1.2x per depth on an AMD "
        "EPYC, 1.2-1.4x on an AVX-512 Intel Xeon; ViT about 1.0x: docs/evaluation.md); best "
        "for serving many depths. Every depth "
        "exported is run from the file and compared with PyTorch before it is kept.",
    )
    p.add_argument("--checkpoint", required=True, help="file written by adn train (or adn import-weights)")
    p.add_argument(
        "--skip",
        default="all",
        help="'all', or comma-separated configs such as TTFF,base (with "
        "--switchable: the depths verified and listed in the manifest; the "
        "file runs every depth)",
    )
    p.add_argument("--format", default="safetensors", choices=FORMATS, help="file format of each sub-network")
    p.add_argument(
        "--switchable",
        action="store_true",
        help="write one file for every depth (switchable.onnx: inputs images and skip, a bool per "
        "stage; or switchable.pt2: a torch.export program using torch.cond) instead of one per depth",
    )
    p.add_argument(
        "--output",
        required=True,
        help="output folder; an earlier adn export there is replaced, anything else in the way is "
        "refused unless --overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a manifest.json and files in --output that no adn export wrote",
    )
    p.add_argument(
        "--table",
        default=None,
        help="with --switchable: depth table (adn depth-table) to put into the manifest, so that adn serve "
        "--model-dir runs the export alone (default: depth_table.json next to the checkpoint, if any)",
    )
    p.add_argument("--accuracy", default=None, help="JSON from `adn eval --json` to record accuracy in the manifest")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..deploy.export import SWITCHABLE_FORMATS, check_export_folder, export_subnetworks, export_switchable
    from ..deploy.predict import depth_table_for
    from ..vision.checkpoint import load_network

    if args.switchable and args.format not in SWITCHABLE_FORMATS:
        raise ValueError(
            f"--switchable writes {' or '.join(SWITCHABLE_FORMATS)}: add --format onnx (or pt2); "
            f"--format {args.format} is written one file per depth, without --switchable"
        )
    check_export_folder(args.output, args.overwrite)  # before the checkpoint is loaded: a wrong --output costs nothing
    net, ckpt = load_network(args.checkpoint)
    meta = ckpt["meta"]
    note_missing_depth_statistics(net, meta, args.checkpoint)
    configs = skip_configs(args.skip, net.num_stages)
    accuracy = None
    if args.accuracy:
        try:
            rows = jsonout.loads(Path(args.accuracy).read_text(), source=args.accuracy)
            accuracy = {r["skip"]: {"acc1": r["acc1"], "acc5": r["acc5"]} for r in rows}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"--accuracy {args.accuracy}: expected the JSON printed by `adn eval --json` ({error})"
            ) from error
    size = meta.get("image_size", 224)
    example = torch.randn(1, meta["in_channels"], size, size)
    if args.table and not args.switchable:
        raise ValueError("--table goes into a switchable export's manifest: add --switchable")
    if args.switchable:
        table = None
        if args.table or (Path(args.checkpoint).parent / "depth_table.json").is_file():
            table = depth_table_for(args.checkpoint, args.table, net.num_stages).to_dict()
        manifest = export_switchable(
            net.eval(),
            configs,
            args.output,
            args.format,
            example,
            accuracy,
            meta=meta,
            depth_table=table,
            overwrite=args.overwrite,
        )
        check = manifest["verification"]
        how = (
            f"largest difference from PyTorch {check['max_difference']:.1e} (tolerance {check['tolerance']:g})"
            if check["verified"]
            else "not run: onnxruntime is not installed (pip install 'adn[onnx]')"
        )
        print(
            f"{Path(args.output) / manifest['file']}  every depth of {manifest['num_stages']} stages; "
            f"{check['depths']} depths checked against PyTorch in {check['engine']}: {how}"
        )
        return 0
    entries = export_subnetworks(
        net.eval(), configs, args.output, args.format, example, accuracy, meta=meta, overwrite=args.overwrite
    )
    for entry in entries:
        print(f"{entry['skip']}  {Path(args.output) / entry['file']}")
    return 0

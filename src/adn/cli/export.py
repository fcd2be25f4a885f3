"""``adn export``: standalone sub-networks, one file each, and a manifest."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .common import note_missing_depth_statistics, skip_configs


def add(sub) -> None:
    from ..deploy.export import FORMATS
    p = sub.add_parser("export", help="write standalone sub-networks (one file each) and a manifest",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="file written by adn train (or adn import-weights)")
    p.add_argument("--skip", default="all", help="'all', or comma-separated configs such as TTFF,base")
    p.add_argument("--format", default="safetensors", choices=FORMATS, help="file format of each sub-network")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--accuracy", default=None, help="JSON from `adn eval --json` to record accuracy in the manifest")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..vision.checkpoint import load_network
    from ..deploy.export import export_subnetworks

    net, ckpt = load_network(args.checkpoint)
    meta = ckpt["meta"]
    note_missing_depth_statistics(net, meta, args.checkpoint)
    configs = skip_configs(args.skip, net.num_stages)
    accuracy = None
    if args.accuracy:
        try:
            accuracy = {r["skip"]: {"acc1": r["acc1"], "acc5": r["acc5"]} for r in json.loads(Path(args.accuracy).read_text())}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"--accuracy {args.accuracy}: expected the JSON printed by `adn eval --json` ({error})") from error
    size = meta.get("image_size", 224)
    example = torch.randn(1, meta["in_channels"], size, size)
    entries = export_subnetworks(net.eval(), configs, args.output, args.format, example, accuracy, meta=meta)
    for entry in entries:
        print(f"{entry['skip']}  {Path(args.output) / entry['file']}")
    return 0

"""Where an evaluation's accuracy comes from: the weights, or the batch-norm running statistics?

For each checkpoint, the accuracy of the super-net and base-net (or an individual network's depth) on
the test split three ways:
- running: the statistics the checkpoint holds (what `adn eval` reports by default);
- recalibrated: statistics recomputed per depth on N batches of un-augmented training images
  (`adn eval --recalibrate-bn N`);
- batch: every test batch normalized with its own statistics (no running statistics at all).
When "running" is far below the other two, the weights are fine and the running averages are stale
(docs/evaluation.md, "Batch-norm statistics you can trust").

    OMP_NUM_THREADS=1 python benchmarks/bn_statistics.py runs/x/checkpoint-e0001-s0000468.pt [...] [--batches 50]
"""

from __future__ import annotations

import argparse
import json

import torch

from adn.vision.checkpoint import load_network
from adn.vision.data import calibration_loader, eval_loader, load_dataset
from adn.vision.evaluate import evaluate_accuracy
from adn.core.recalibrate import batch_norms
from adn.core.skip import SkipConfig


@torch.no_grad()
def batch_statistics_accuracy(net, loader, configs) -> dict[str, float]:
    """Accuracy with every norm in training mode and momentum 0: each batch normalized by itself, the
    running statistics neither used nor changed."""
    norms = batch_norms(net)
    saved = [norm.momentum for norm in norms]
    results = {}
    try:
        net.eval()
        for norm in norms:
            norm.train()
            norm.momentum = 0.0
        for config in configs:
            correct = seen = 0
            for images, targets in loader:
                correct += (net(images, skip=config).argmax(1) == targets).sum().item()
                seen += targets.numel()
            results[str(config)] = 100.0 * correct / seen
    finally:
        for norm, momentum in zip(norms, saved):
            norm.momentum = momentum
        net.eval()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--batches", type=int, default=50, help="calibration batches of 256 training images")
    args = parser.parse_args()
    for path in args.checkpoints:
        net, ckpt = load_network(path)
        meta = ckpt["meta"]
        data = load_dataset(meta["dataset"], meta.get("data_path"), augment=False)
        test = eval_loader(data.val, 500)
        trained = meta.get("trained_skip")
        configs = (
            [SkipConfig(trained, net.num_stages)]
            if trained
            else [SkipConfig.super_net(net.num_stages), SkipConfig.base_net(net.num_stages)]
        )
        calibration = calibration_loader(data.train, 256, args.batches)
        row = {
            "checkpoint": path,
            "epoch": ckpt.get("epoch", -1) + 1,
            "running": {k: v["acc1"] for k, v in evaluate_accuracy(net, test, configs).items()},
            "recalibrated": {
                k: v["acc1"]
                for k, v in evaluate_accuracy(net, test, configs, recalibrate=(calibration, args.batches)).items()
            },
            "batch": batch_statistics_accuracy(net, test, configs),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

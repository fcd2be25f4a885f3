"""How fast `adn train` gets through Fashion-MNIST with the small ResNet, and what each speed-up buys.

1. Data: one epoch of augmented training batches (crop with padding 2 + flip, normalized), without
   training: the per-image path (torchvision transforms on PIL images through a DataLoader, each image
   seeded by (seed, epoch, index)) against the in-memory path (one uint8 tensor, the whole batch
   augmented by a few tensor operations).
2. Steps: median time of an Algorithm 1 step (super-net + base-net) and of a plain step of the
   individual network, in float32 NCHW, float32 channels-last and bfloat16 autocast + channels-last
   (what `adn train` picks on a CPU with native bfloat16). Interleaved rounds; ratios to float32 NCHW.

    OMP_NUM_THREADS=1 python benchmarks/training_speed.py [--threads 1] [--batch 128] [--steps 12]

Ratios are what to compare across machines; absolute times only with the machine they came from.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def time_data_paths(batch: int) -> dict[str, float]:
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    from adn.vision.data import collate_readable, load_dataset
    from adn.vision.memory_data import training_batches
    from adn.training.sampling import EpochBatches, SeededSamples

    data = load_dataset("fashion-mnist")
    per_image = load_dataset("fashion-mnist")
    # The per-image path of earlier versions: PIL crop/flip/ToTensor/Normalize for each image.
    per_image.train.transform = T.Compose(
        [T.RandomCrop(28, padding=2), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(data.mean, data.std)]
    )
    times = {}
    started = time.perf_counter()
    for _ in training_batches(data.train, EpochBatches(len(data.train), batch, seed=0, epoch=0)):
        pass
    times["in-memory batches"] = time.perf_counter() - started
    loader = DataLoader(
        SeededSamples(per_image.train, 0),
        batch_sampler=EpochBatches(len(data.train), batch, 0, 0),
        collate_fn=collate_readable,
    )
    started = time.perf_counter()
    for _ in loader:
        pass
    times["per-image DataLoader"] = time.perf_counter() - started
    return times


def time_steps(batch: int, steps: int) -> dict[str, dict[str, float]]:
    import adn
    from adn.core.distill import SubPathDistillationLoss
    from adn.training.precision import Precision
    from adn.training.methods import adn_step, individual_step

    settings = {
        "float32 NCHW": (False, False),
        "float32 channels-last": (False, True),
        "bfloat16 + channels-last": (True, True),
    }
    setups = {}
    for name, (amp, channels_last) in settings.items():
        torch.manual_seed(0)
        net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=8)).train()
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        if channels_last:
            net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        setups[name] = (net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), x, y, Precision("cpu", amp))
    loss, ce = SubPathDistillationLoss(0.5, 1.0, "spatial"), nn.CrossEntropyLoss()

    def step(method, net, optimizer, x, y, precision):
        optimizer.zero_grad(set_to_none=True)
        if method == "adn":
            adn_step(net, x, y, loss, precision=precision)
        else:
            individual_step(net, x, y, ce, precision=precision)
        optimizer.step()

    samples = {(method, name): [] for method in ("adn", "individual") for name in settings}
    for round_index in range(steps + 2):  # two warm-up rounds
        for (method, name), times in samples.items():
            started = time.perf_counter()
            step(method, *setups[name])
            if round_index >= 2:
                times.append(time.perf_counter() - started)
    return {
        method: {name: statistics.median(samples[(method, name)]) for name in settings}
        for method in ("adn", "individual")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"resnet20 width 8, Fashion-MNIST 28x28, batch {args.batch}, {torch.get_num_threads()} thread(s)")
    data = time_data_paths(args.batch)
    base = data["per-image DataLoader"]
    print("\none epoch of augmented batches (no training):")
    for name, seconds in data.items():
        print(f"  {name:24s} {seconds:7.2f} s   {base / seconds:5.1f}x")
    steps = time_steps(args.batch, args.steps)
    for method, times in steps.items():
        reference = times["float32 NCHW"]
        print(f"\n{method} step (median of {args.steps}):")
        for name, seconds in times.items():
            print(
                f"  {name:24s} {seconds * 1000:7.1f} ms  {reference / seconds:5.2f}x   "
                f"{args.batch / seconds:6.0f} images/s"
            )


if __name__ == "__main__":
    main()

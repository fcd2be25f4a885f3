"""Which images each step trains on, and their random augmentation: functions of (seed, epoch) only.

That one property gives three guarantees: a run resumed mid-epoch continues with exactly the batches
it would have seen; K processes together train on the same global batches as one process with a K
times larger batch; and the number of data-loading workers does not change what is trained on.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch (the same as ``RandomSampler`` seeded with ``seed * 1000 + epoch``,
    what earlier adn versions used, so their checkpoints resume into the same order)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


class EpochBatches(Sampler[list[int]]):
    """One process's batches of one epoch.

    Global batch ``i`` is ``order[i*B:(i+1)*B]`` with ``B = batch_size * world_size``; process ``r``
    takes the ``r``-th of ``world_size`` equal, contiguous parts. The incomplete last global batch is
    dropped, except when the data set is smaller than one global batch (then it is the only batch).
    ``start`` skips batches already trained on (resuming mid-epoch) without loading them; ``steps``
    caps the number of batches (``--max-steps-per-epoch``)."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        steps: int | None = None,
    ):
        if size < world_size:
            raise ValueError(
                f"the training set has {size} images, fewer than the {world_size} processes; "
                f"every process needs at least one"
            )
        self.size, self.seed, self.epoch = size, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        full = max(1, size // self.global_batch)
        self.steps = full if steps is None else min(full, steps)
        self.start = start

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self):
        for _, batch, part in self.global_batches():
            yield batch[part]

    def global_batches(self):
        """``(step, global batch, this process's slice of it)`` for each remaining step."""
        order = epoch_order(self.size, self.seed, self.epoch)
        for step in range(self.start, self.steps):
            batch = order[step * self.global_batch : (step + 1) * self.global_batch]
            share = len(batch)  # smaller than global_batch only for a data set smaller than one batch
            yield step, batch, slice(share * self.rank // self.world_size, share * (self.rank + 1) // self.world_size)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # Distinct, reproducible seeds per (run seed, epoch, image); kept below 2**63 for torch.manual_seed.
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63)


class SeededSamples(Dataset):
    """Wraps a training set so that image ``i`` in epoch ``e`` is augmented with torch's RNG seeded by
    ``(seed, e, i)``: the same crop and flip whichever process or worker loads it, resumed or not.
    The caller's RNG stream is left untouched. Set :attr:`epoch` before each epoch."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # The CPU generator alone: torch.manual_seed would also queue CUDA seeding, ~100x slower.
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(sample_seed(self.seed, self.epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)

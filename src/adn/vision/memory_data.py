"""Small image sets held in memory as one uint8 tensor, augmented a whole batch at a time.

Fashion-MNIST (47 MB) and CIFAR (150 MB) fit in memory, so their training loop needs no per-image
Python work: a step indexes the tensor, then crops, flips and normalizes the batch with a few tensor
operations (on the GPU when training there). The random crop and flip of each global batch are drawn
from a generator seeded by (run seed, epoch, step): the same with any number of processes (each takes
its slice) and on resume, the two properties :mod:`adn.sampling` guarantees for the per-image path.

Augmentations beyond crop and flip (AutoAugment, random erasing) need PIL images: a
:class:`TensorImages` built with ``transform`` then serves PIL-transformed samples one at a time
through an ordinary ``DataLoader`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..training.sampling import EpochBatches, sample_seed


@dataclass(frozen=True)
class BatchAugment:
    """Random crop of the image size after zero padding by ``padding`` pixels (as torchvision's
    ``RandomCrop(size, padding)``), then a horizontal flip with probability 1/2."""

    padding: int = 0
    flip: bool = True


class TensorImages(Dataset):
    """Images ``[N, C, H, W]`` (uint8) and labels ``[N]`` (int64), normalized with ``mean``/``std``.

    ``dataset[i]`` is the normalized, un-augmented image (or, with ``transform``, that transform of the
    PIL image); :meth:`batch` gives whole normalized batches, augmented with ``augment`` if set."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        mean,
        std,
        augment: BatchAugment | None = None,
        transform: Callable | None = None,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4 or targets.shape != images.shape[:1]:
            raise ValueError(
                f"expected uint8 images [N, C, H, W] and N labels, got {images.dtype} "
                f"{tuple(images.shape)} and {tuple(targets.shape)}"
            )
        self.images, self.targets = images, targets.long()
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment, self.transform = augment, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        if self.transform is not None:
            image = self.images[index].cpu()
            pil = (
                Image.fromarray(image[0].numpy(), mode="L")
                if image.shape[0] == 1
                else Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB")
            )
            return self.transform(pil), int(self.targets[index])
        return self.normalize(self.images[index : index + 1])[0], int(self.targets[index])

    @property
    def batched(self) -> bool:
        """Whether training can use :meth:`batch` (no per-image PIL transform is needed)."""
        return self.transform is None

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> "TensorImages":
        """The same images on ``device`` (a GPU keeps the whole set resident)."""
        return TensorImages(
            self.images.to(device), self.targets.to(device), self.mean, self.std, self.augment, self.transform
        )

    def subset(self, indices) -> "TensorImages":
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        return TensorImages(
            self.images[indices], self.targets[indices], self.mean, self.std, self.augment, self.transform
        )

    def without_augmentation(self) -> "TensorImages":
        return TensorImages(self.images, self.targets, self.mean, self.std)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None, part: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized images and labels of ``indices[part]``. With an augmentation and a ``generator``
        (CPU), the random crops and flips are drawn for all of ``indices`` (the global batch) and
        ``part`` keeps this process's share, so the split over processes does not change them."""
        mine = indices[part].to(self.images.device)
        images = self.images[mine]
        if self.augment is not None and generator is not None:
            images = self._augment(images, len(indices), generator, part)
        return self.normalize(images), self.targets[mine]

    def _augment(self, images: torch.Tensor, total: int, generator: torch.Generator, part: slice) -> torch.Tensor:
        pad, device = self.augment.padding, images.device
        offsets = torch.randint(0, 2 * pad + 1, (total, 2), generator=generator)[part].to(device)
        flips = (torch.rand(total, generator=generator) < 0.5)[part].to(device)
        if pad:
            height, width = images.shape[-2:]
            padded = F.pad(images, (pad, pad, pad, pad))  # zeros, as RandomCrop's default fill
            rows = offsets[:, :1] + torch.arange(height, device=device)  # [B, H]
            cols = offsets[:, 1:] + torch.arange(width, device=device)  # [B, W]
            picked = torch.arange(images.shape[0], device=device)[:, None, None]
            # Advanced indexing around a slice puts the indexed dims first: [B, H, W, C]. The permuted view
            # keeps NHWC memory, which convolutions take as channels-last even where the run chose not to
            # (and with one channel .contiguous() keeps it): copy into plain NCHW memory. Channels-last
            # backward of tiny convolutions corrupts memory in oneDNN on AVX2-only CPUs (resnet20 --width 4).
            images = padded[picked, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
            images = images.clone(memory_format=torch.contiguous_format)
        if self.augment.flip:
            images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        return images


def training_batches(dataset: TensorImages, batches: EpochBatches) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """One epoch of ``(images, targets, skipped)`` for this process, in the order of ``batches``;
    ``skipped`` is always 0 (in-memory images are never unreadable)."""
    for step, global_batch, part in batches.global_batches():
        generator = torch.Generator().manual_seed(sample_seed(batches.seed, batches.epoch, step))
        images, targets = dataset.batch(torch.tensor(global_batch, dtype=torch.long), generator, part)
        yield images, targets, 0


class EvalBatches:
    """Consecutive un-augmented batches of a :class:`TensorImages`, like an unshuffled ``DataLoader``."""

    def __init__(self, dataset: TensorImages, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.dataset), self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, len(self.dataset)))
            yield self.dataset.batch(index)

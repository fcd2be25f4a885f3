"""Datasets: Fashion-MNIST, CIFAR-10/100, ImageNet-layout folders, and random fake data.

Every loader reads through torchvision's datasets. Fashion-MNIST and CIFAR are held in memory as one
uint8 tensor and augmented a batch at a time (:mod:`adn.memory_data`); image folders go through
torchvision's per-image transforms. Fashion-MNIST is taken from the Debian package
``dataset-fashion-mnist`` when installed (offline), else downloaded by torchvision.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision import datasets
from torchvision import transforms as T

from ..errors import CheckpointError, DataError
from ..training.signals import ignore_interrupts  # re-exported: adn.vision.data.ignore_interrupts
from ..utils.atomic import atomic_write
from .memory_data import BatchAugment, EvalBatches, TensorImages

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "fake")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


AUTO_AUGMENT_POLICIES = ("imagenet", "cifar10", "svhn", "ra", "ta_wide", "augmix")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass
class Augmentation:
    """Training-time augmentation beyond each dataset's crop and flip, named as in torchvision's
    reference scripts: ``--auto-augment``, ``--random-erase``, ``--interpolation``."""

    auto_augment: str | None = None
    random_erase: float = 0.0
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.auto_augment is not None and self.auto_augment not in AUTO_AUGMENT_POLICIES:
            raise DataError(
                f"--auto-augment must be one of {', '.join(AUTO_AUGMENT_POLICIES)}, got {self.auto_augment!r}"
            )
        if not 0.0 <= self.random_erase <= 1.0:
            raise DataError(f"--random-erase is a probability in [0, 1], got {self.random_erase}")
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    @property
    def mode(self) -> T.InterpolationMode:
        return T.InterpolationMode(self.interpolation)


def _auto_augment(policy: str, mode: T.InterpolationMode):
    if policy == "ra":
        return T.RandAugment(interpolation=mode)
    if policy == "ta_wide":
        return T.TrivialAugmentWide(interpolation=mode)
    if policy == "augmix":
        return T.AugMix(interpolation=mode)
    return T.AutoAugment(T.AutoAugmentPolicy(policy), interpolation=mode)


def _train_transform(geometric: list, mean, std, aug: Augmentation | None) -> T.Compose:
    """crop/flip -> auto-augment -> tensor -> normalize -> random erasing (torchvision's order)."""
    if aug is None:
        return T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    steps = list(geometric)
    if aug.auto_augment:
        steps.append(_auto_augment(aug.auto_augment, aug.mode))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if aug.random_erase > 0:
        steps.append(T.RandomErasing(p=aug.random_erase))
    return T.Compose(steps)


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str


def default_cache() -> Path:
    return Path(os.environ.get("ADN_DATA", Path.home() / ".cache" / "adn" / "datasets"))


def load_dataset(
    name: str,
    data_path: str | os.PathLike | None = None,
    *,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    val_resize_size: int | None = None,
    augment: bool | Augmentation = True,
    skip_bad_images: bool = False,
    val_from_train: int | None = None,
    download: bool = True,
) -> DataBundle:
    """Build train and validation datasets. ``train_subset``/``val_subset`` keep a fixed random subset
    (seeded) of that many images, for quick runs. ``augment``: ``True`` for each dataset's standard
    crop and flip, an :class:`Augmentation` for more, ``False`` for none (evaluation).
    ``skip_bad_images`` (image folders): an unreadable image file comes out as ``None`` (dropped by
    :func:`collate_readable`) instead of stopping with a :class:`DataError` that names the file.
    ``val_from_train``: validate on that many training images (held out from training; the same ones for
    every seed) instead of the test split, so that recipes are chosen without looking at the test set.
    ``download=False``: never download (nor create the folder to download into); for settings read from a
    checkpoint, which must not make adn fetch files or create folders of its choosing."""
    augment = Augmentation() if augment is True else (augment or None)
    if name == "fashion-mnist":
        bundle = _fashion_mnist(data_path, augment, download)
    elif name in ("cifar10", "cifar100"):
        bundle = _cifar(name, data_path, augment, download)
    elif name == "imagefolder":
        bundle = _image_folder(data_path, image_size or 224, val_resize_size, augment, skip_bad_images)
    elif name == "fake":
        bundle = _fake(image_size or 32)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if val_from_train:
        bundle = _hold_out(
            bundle,
            val_from_train,
            lambda: (
                load_dataset(
                    name,
                    data_path,
                    image_size=image_size,
                    val_resize_size=val_resize_size,
                    augment=False,
                    skip_bad_images=skip_bad_images,
                    download=download,
                ).train
            ),
        )
    bundle.train = _subset(bundle.train, train_subset, seed, "train")
    bundle.val = _subset(bundle.val, val_subset, seed + 1, "val")
    return bundle


def checkpoint_data(
    meta: dict,
    source,
    data: str | None = None,
    data_path: str | None = None,
    val_subset: int | None = None,
    skip_bad_images: bool = False,
) -> DataBundle:
    """The data set a checkpoint was trained on (or ``data``/``data_path``), un-augmented, checked
    against the checkpoint's class count: what eval and recalibrate read, and what ``adn train`` measures
    per-depth statistics on at its end. ``source``: the checkpoint's path, for messages."""
    cfg = meta.get("config", {})
    if not (data or meta.get("dataset")):
        raise CheckpointError(f"{source} does not say which dataset it was trained on; pass --data")
    # What the checkpoint names is read where it already is; downloads need --data or --data-path from the user.
    bundle = load_dataset(
        data or meta["dataset"],
        data_path or meta.get("data_path"),
        val_subset=val_subset,
        seed=cfg.get("seed", 0),
        augment=False,
        image_size=cfg.get("train_crop_size"),
        val_resize_size=cfg.get("val_resize_size"),
        skip_bad_images=skip_bad_images,
        download=bool(data or data_path),
    )
    if bundle.num_classes != meta["num_classes"]:
        raise DataError(
            f"the dataset has {bundle.num_classes} classes but the checkpoint predicts {meta['num_classes']}"
        )
    return bundle


def calibration_loader(train: Dataset, batch_size: int, num_batches: int, workers: int = 0, collate_fn=None):
    """``num_batches`` batches of training images for norm recalibration: a fixed random choice (the
    same for every depth and every call), un-augmented when ``train`` is in memory (load the data set
    with ``augment=False`` otherwise). ``collate_fn``: :func:`collate_readable_pairs` when unreadable
    images are skipped."""
    count = min(len(train), batch_size * num_batches)
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(HOLDOUT_SEED + 1))[:count].tolist()
    images = train.without_augmentation().subset(chosen) if isinstance(train, TensorImages) else Subset(train, chosen)
    return eval_loader(images, batch_size, workers, collate_fn)


def eval_loader(dataset: Dataset, batch_size: int, workers: int = 0, collate_fn=None):
    """Unshuffled ``(images, targets)`` batches of an evaluation split: whole-tensor batches for an
    in-memory set, a ``DataLoader`` otherwise."""
    if isinstance(dataset, TensorImages):
        return EvalBatches(dataset, batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_fn or default_collate,
        worker_init_fn=ignore_interrupts,
    )


def _subset(dataset: Dataset, size: int | None, seed: int, split: str) -> Dataset:
    if size is None:
        return dataset
    if size < 1:
        raise DataError(f"--{split}-subset must be a positive number of images, got {size}")
    if size >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:size].tolist()
    return dataset.subset(indices) if isinstance(dataset, TensorImages) else Subset(dataset, indices)


HOLDOUT_SEED = 20_231_129  # one fixed choice of held-out images, whatever the run's seed


def _hold_out(bundle: DataBundle, size: int, plain_train: Callable[[], Dataset]) -> DataBundle:
    """Move ``size`` training images (a fixed random choice) to the validation split. ``plain_train``
    gives the training split without augmentation, for data sets that cannot drop it themselves."""
    if not 1 <= size < len(bundle.train):
        raise DataError(
            f"--val-from-train must be between 1 and {len(bundle.train) - 1} (the training set has "
            f"{len(bundle.train)} images), got {size}"
        )
    order = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    held, kept = order[:size].sort().values.tolist(), order[size:].sort().values.tolist()
    if isinstance(bundle.train, TensorImages):
        bundle.val = bundle.train.subset(held).without_augmentation()
        bundle.train = bundle.train.subset(kept)
    else:
        bundle.val, bundle.train = Subset(plain_train(), held), Subset(bundle.train, kept)
    bundle.description += f", {size} training images held out for validation"
    return bundle


# ----- Fashion-MNIST --------------------------------------------------------------------------------
def fashion_mnist_root(data_path: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """A root in torchvision's layout (``<root>/FashionMNIST/raw/<files>``) and whether torchvision
    must download. Looks at ``data_path`` (a folder of IDX files, gzipped or not, or a torchvision
    root), then the Debian package, then the cache."""
    candidates = [Path(data_path)] if data_path else [DEBIAN_FASHION_MNIST, default_cache()]
    if data_path and not Path(data_path).exists():
        raise DataError(
            f"Fashion-MNIST path {data_path} does not exist; give a folder holding "
            f"{', '.join(FASHION_MNIST_FILES)} (optionally .gz), or omit --data-path to use the "
            f"Debian package dataset-fashion-mnist or torchvision's download"
        )
    for folder in candidates:
        if _has_idx_files(folder / "FashionMNIST" / "raw"):
            return folder, False
        if _has_idx_files(folder):
            return _stage_idx_files(folder), False
    if data_path:
        raise DataError(
            f"{data_path} holds no Fashion-MNIST IDX files; expected {', '.join(FASHION_MNIST_FILES)} "
            f"(or .gz) directly inside it, or in FashionMNIST/raw/"
        )
    return default_cache(), True


def _has_idx_files(folder: Path) -> bool:
    return all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES)


def _stage_idx_files(folder: Path) -> Path:
    """Lay IDX files out where torchvision's FashionMNIST reads them, decompressing .gz once."""
    root = default_cache() / "fashion-mnist-staged" / hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target, source = raw / name, folder / name
        given = source if source.is_file() else Path(f"{source}.gz")
        # Staged once, and again when the given file is newer (replaced after a bad copy was staged).
        if target.is_file() and target.stat().st_mtime_ns >= given.stat().st_mtime_ns:
            continue
        atomic_write(target, lambda tmp, source=source: _copy_idx(source, tmp))
    return root


def _copy_idx(plain: Path, destination: str) -> None:
    """Copy an IDX file, decompressing ``<plain>.gz`` when only that exists."""
    if plain.is_file():
        shutil.copyfile(plain, destination)
    else:
        with gzip.open(f"{plain}.gz", "rb") as src, open(destination, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _fashion_mnist(data_path, augment: Augmentation | None, allow_download: bool = True) -> DataBundle:
    root, download = fashion_mnist_root(data_path)
    if download and not allow_download:
        raise DataError(
            "Fashion-MNIST is not on this machine (no --data-path, no Debian package dataset-fashion-mnist, "
            "nothing in the cache) and a checkpoint's settings never start a download: pass "
            "--data fashion-mnist to download it, or --data-path DIR"
        )
    mean, std = (0.2860,), (0.3530,)
    try:
        train = datasets.FashionMNIST(str(root), train=True, download=download)
        val = datasets.FashionMNIST(str(root), train=False, download=download)
    except (RuntimeError, OSError) as error:
        if not download:  # the files are there but unreadable
            raise DataError(
                f"could not read the Fashion-MNIST IDX files in {data_path or root} ({error}): they are "
                f"truncated or corrupt; replace them (Debian package dataset-fashion-mnist, or "
                f"torchvision's download)"
            ) from error
        raise DataError(
            f"could not load Fashion-MNIST ({error}). Offline, install the Debian package: "
            f"apt-get install dataset-fashion-mnist (files in {DEBIAN_FASHION_MNIST})"
        ) from error
    source = "torchvision download" if download else str(root)
    train_set, val_set = _in_memory(
        train.data[:, None], train.targets, val.data[:, None], val.targets, mean, std, augment, padding=2
    )
    return DataBundle(train_set, val_set, 10, 1, 28, mean, std, f"Fashion-MNIST ({source})")


def _in_memory(
    train_images, train_targets, val_images, val_targets, mean, std, augment: Augmentation | None, padding: int
) -> tuple[TensorImages, TensorImages]:
    """Both splits as in-memory uint8 tensors. Crop and flip run on whole batches; an augmentation that
    needs PIL (AutoAugment, random erasing) makes the training split serve PIL-transformed images."""
    batch_augment = transform = None
    if augment is not None:
        size = train_images.shape[-1]
        if augment.auto_augment or augment.random_erase > 0:
            transform = _train_transform(
                [T.RandomCrop(size, padding=padding), T.RandomHorizontalFlip()], mean, std, augment
            )
        else:
            batch_augment = BatchAugment(padding=padding, flip=True)
    train = TensorImages(train_images, torch.as_tensor(train_targets), mean, std, batch_augment, transform)
    return train, TensorImages(val_images, torch.as_tensor(val_targets), mean, std)


# ----- CIFAR ---------------------------------------------------------------------------------------------
def _cifar(name: str, data_path, augment: Augmentation | None, download: bool = True) -> DataBundle:
    root = Path(data_path) if data_path else default_cache()
    cls, classes = (datasets.CIFAR10, 10) if name == "cifar10" else (datasets.CIFAR100, 100)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    try:
        train = cls(str(root), train=True, download=download)
        val = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as error:
        if not download:
            raise DataError(
                f"{name} is not in {root} and a checkpoint's settings never start a download: pass "
                f"--data {name} to download it, or --data-path DIR with torchvision's extracted "
                f"{name} folder"
            ) from error
        raise DataError(
            f"could not load {name} from {root} ({error}). Without internet, place torchvision's "
            f"extracted CIFAR folder there and pass --data-path"
        ) from error
    as_tensor = lambda array: torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()  # noqa: E731  (NHWC -> NCHW)
    train_set, val_set = _in_memory(
        as_tensor(train.data), train.targets, as_tensor(val.data), val.targets, mean, std, augment, padding=4
    )
    return DataBundle(train_set, val_set, classes, 3, 32, mean, std, f"{name.upper()} ({root})")


# ----- ImageNet-layout folders -------------------------------------------------------------------------
# PIL modes of 16-bit (and 32-bit integer) grayscale images, e.g. 16-bit PNGs and TIFFs. PIL's convert()
# to "L" or "RGB" clips their values at 255 instead of scaling them, which turns almost every pixel white.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_warned_images: set[str] = set()  # files whose decoder warnings were already reported (once per file)


class PixelRangeError(ValueError):
    """A floating-point image whose values fit no range adn can convert without guessing."""


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as an 8-bit one ("L"), its 0..65535 range scaled to 0..255 (divided by
    257, so that white stays white); a floating-point one ("F", e.g. a float TIFF) by its range: values
    within [0, 1] are scaled by 255, values within [0, 255] rounded; other images unchanged. PIL's own
    conversion clips, which turned a [0, 1] image all black. A float image with values outside [0, 255]
    (or NaN) raises :class:`PixelRangeError`: it has no one meaning as pixels."""
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise PixelRangeError("its floating-point pixels include NaN or infinite values")
        low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
        if low < 0 or high > 255:
            raise PixelRangeError(
                f"its floating-point pixels range from {low:g} to {high:g}, neither within [0, 1] "
                f"nor within [0, 255]; save it as an 8- or 16-bit image, scaled as it should look"
            )
        scale = 255.0 if high <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8))
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    pixels = np.asarray(image).astype(np.float64) / 257
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """The image file at ``path`` decoded and converted to ``mode`` ("RGB" or "L"), 16-bit images scaled
    (:func:`to_8bit`). Truncated or undecodable data raises ``OSError`` (PIL's default); what the decoder
    only warns about (damaged metadata, a malformed MPO header, a huge image) is reported on stderr,
    naming the file, once per file: the image is used, but the user should know it may be damaged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(path) as image:
            image.load()  # decode now, inside the warning capture (PIL decodes lazily)
            try:
                converted = to_8bit(image).convert(mode)
            except PixelRangeError as error:
                raise PixelRangeError(f"image {path} cannot be used: {error}") from error
    _report_decoder_warnings(path, caught)
    return converted


def _report_decoder_warnings(path, caught: list) -> None:
    messages = list(
        dict.fromkeys(
            str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, ResourceWarning))
        )
    )
    if not messages or str(path) in _warned_images:
        return
    _warned_images.add(str(path))
    print(
        f"adn: warning: image {path} may be damaged; the decoder reported: {'; '.join(messages)}. It is used "
        f"as decoded; check it, and replace or delete it if it looks wrong",
        file=sys.stderr,
        flush=True,
    )


class CheckedImageFolder(datasets.ImageFolder):
    """An ImageFolder whose unreadable files (corrupt, truncated, not an image) are named in a
    :class:`DataError`, or, with ``skip_bad=True``, reported on stderr and returned as ``None``. Files
    are read by :func:`read_image` (16-bit images scaled, decoder warnings reported)."""

    def __init__(self, root: str, transform, skip_bad: bool = False):
        super().__init__(root, transform=transform, loader=read_image)
        self.skip_bad = skip_bad

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # what PIL raises for bad files
            if not self.skip_bad:
                raise DataError(
                    f"cannot read image {path} ({type(error).__name__}: {error}); replace or delete "
                    f"the file, or pass --skip-bad-images to skip unreadable images"
                ) from error
            print(f"adn: warning: skipping unreadable image {path} ({error})", file=sys.stderr, flush=True)
            return None
        return (image if self.transform is None else self.transform(image)), target


def collate_readable(batch: list):
    """``default_collate`` of the samples that are not ``None`` (unreadable images skipped), plus how
    many were skipped: ``(images, targets, skipped)``; ``images`` is ``None`` if all were."""
    readable = [sample for sample in batch if sample is not None]
    images, targets = default_collate(readable) if readable else (None, None)
    return images, targets, len(batch) - len(readable)


def collate_readable_pairs(batch: list):
    """Like :func:`collate_readable` for evaluation loaders, which expect ``(images, targets)``."""
    images, targets, _ = collate_readable(batch)
    if images is None:
        raise DataError(f"none of the {len(batch)} images of a validation batch could be read; check the image folder")
    return images, targets


class ReadableBatches:
    """``(images, targets)`` batches of a loader built with :func:`collate_readable`, counting the
    unreadable images it skipped in ``skipped`` (that of the latest pass: the count is made here, in
    the main process, because the collate function runs in the loader's worker processes)."""

    def __init__(self, loader: DataLoader):
        self.loader, self.skipped = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.skipped = 0
        for images, targets, skipped in self.loader:
            self.skipped += skipped
            if images is not None:  # else every image of the batch was unreadable
                yield images, targets


def first_readable(dataset: Dataset):
    """The first sample of ``dataset`` that is not ``None`` (an unreadable image skipped)."""
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is not None:
            return sample
    raise DataError(f"none of the {len(dataset)} images could be read; check the image folder")


def _image_folder(
    data_path, crop: int, resize: int | None, augment: Augmentation | None, skip_bad: bool = False
) -> DataBundle:
    if not data_path:
        raise DataError(
            "--data imagefolder needs --data-path DIR, a folder with train/ and val/ holding one "
            "sub-folder of images per class (the ImageNet layout)"
        )
    root = Path(data_path)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(
                f"{root / split} is not a folder; --data-path must hold train/ and val/, each with one "
                f"sub-folder of images per class"
            )
    resize = resize or int(round(crop / 0.875))
    mode = (augment or Augmentation()).mode
    center = [T.Resize(resize, interpolation=mode), T.CenterCrop(crop)]
    if augment is None:  # evaluation-style transforms for both splits
        train_tf = T.Compose(center + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    else:
        train_tf = _train_transform(
            [T.RandomResizedCrop(crop, interpolation=mode), T.RandomHorizontalFlip()],
            IMAGENET_MEAN,
            IMAGENET_STD,
            augment,
        )
    val_tf = T.Compose(center + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        train = CheckedImageFolder(str(root / "train"), train_tf, skip_bad)
        val = CheckedImageFolder(str(root / "val"), val_tf, skip_bad)
    except (FileNotFoundError, OSError) as error:
        raise DataError(
            f"could not read image folders under {root}: {error} (expected train/ and val/, each with "
            f"one sub-folder of images per class, the ImageNet layout)"
        ) from error
    if train.classes != val.classes:
        raise DataError(
            f"train/ and val/ under {root} have different class folders "
            f"({len(train.classes)} vs {len(val.classes)}); they must match"
        )
    return DataBundle(train, val, len(train.classes), 3, crop, IMAGENET_MEAN, IMAGENET_STD, f"image folders ({root})")


# ----- fake data ---------------------------------------------------------------------------------------
def _fake(image_size: int) -> DataBundle:
    """Random images (torchvision FakeData): for smoke tests and benchmarks, not for accuracy."""
    tf = T.ToTensor()
    train = datasets.FakeData(512, (3, image_size, image_size), num_classes=10, transform=tf, random_offset=0)
    val = datasets.FakeData(128, (3, image_size, image_size), num_classes=10, transform=tf, random_offset=10_000)
    return DataBundle(train, val, 10, 3, image_size, (0.5,) * 3, (0.25,) * 3, "fake random images")

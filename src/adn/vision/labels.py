"""Class names: what each output of a classification network means.

``adn train`` writes them into the checkpoint's metadata (``meta["class_names"]``, one per class, in
output order) so that ``adn predict``, ``adn serve`` and exported manifests can answer "Sneaker" instead
of "7". Checkpoints written before that, and imported weights, have none: their classes are named by
index ("0", "1", ...).
"""

from __future__ import annotations

import os
from pathlib import Path

# torchvision's names for these data sets: FashionMNIST.classes, and the label names CIFAR's own
# batches.meta / meta files hold (torchvision reads those from disk, so they are written out here).
FASHION_MNIST = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100 = (
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
)
_KNOWN = {"fashion-mnist": FASHION_MNIST, "cifar10": CIFAR10, "cifar100": CIFAR100}
MAX_NAME_LENGTH = 200


def dataset_class_names(dataset: str, data_path: str | os.PathLike | None, num_classes: int) -> list[str]:
    """The class names of a data set adn trains on, in label order: torchvision's for Fashion-MNIST and
    CIFAR, the class folder names for an image folder (sorted, as ImageFolder numbers them), "class0", ...
    for fake data; indices when none are known or they do not match ``num_classes``."""
    if dataset in _KNOWN:
        names = list(_KNOWN[dataset])
    elif dataset == "imagefolder" and data_path:
        # The folders ImageFolder turns into classes: the sub-folders of train/, sorted.
        names = sorted(entry.name for entry in os.scandir(Path(data_path) / "train") if entry.is_dir())
    elif dataset == "fake":
        names = [f"class{i}" for i in range(num_classes)]
    else:
        names = []
    return names if len(names) == num_classes else index_names(num_classes)


def index_names(num_classes: int) -> list[str]:
    """ "0", "1", ...: the names of classes nobody named."""
    return [str(i) for i in range(num_classes)]


def class_names(meta: dict, source: str = "checkpoint") -> list[str]:
    """The class names a checkpoint's metadata records, checked (they came from a file); indices for a
    checkpoint that records none."""
    count = meta["num_classes"]
    names = meta.get("class_names")
    if names is None:
        return index_names(count)
    valid = (
        isinstance(names, (list, tuple))
        and len(names) == count
        and all(isinstance(n, str) and 0 < len(n) <= MAX_NAME_LENGTH for n in names)
    )
    if not valid:
        shown = repr(names) if len(repr(names)) <= 80 else repr(names)[:77] + "..."
        raise ValueError(
            f"{source} has invalid metadata: class_names = {shown}, expected {count} non-empty strings "
            f"(one per class, at most {MAX_NAME_LENGTH} characters); it was altered. Remove the key to "
            f"name the classes by index"
        )
    return list(names)

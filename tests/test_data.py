import pytest
import torch

from adn.vision.data import DEBIAN_FASHION_MNIST, load_dataset
from adn.errors import DataError
from tests.conftest import write_idx, write_image_folder


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files_gzipped_or_not(tmp_path, compress):
    folder = write_idx(tmp_path / "fm", compress=compress, n_train=40, n_test=20)
    data = load_dataset("fashion-mnist", folder, augment=False)
    assert (len(data.train), len(data.val), data.num_classes, data.in_channels) == (40, 20, 10, 1)
    image, label = data.val[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10


def test_subsets_are_fixed_by_the_seed(fashion_dir):
    a = load_dataset("fashion-mnist", fashion_dir, train_subset=50, val_subset=30, seed=3)
    b = load_dataset("fashion-mnist", fashion_dir, train_subset=50, val_subset=30, seed=3)
    assert len(a.train) == 50 and len(a.val) == 30
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.targets, b.val.targets)
    c = load_dataset("fashion-mnist", fashion_dir, train_subset=50, val_subset=30, seed=4)
    assert not torch.equal(a.train.images, c.train.images)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package():
    data = load_dataset("fashion-mnist", augment=False)
    assert (len(data.train), len(data.val)) == (60000, 10000)
    labels = torch.tensor([data.val[i][1] for i in range(0, 10000, 50)])
    assert labels.unique().numel() == 10


def test_image_folders_in_imagenet_layout(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=2, size=40)
    data = load_dataset("imagefolder", root, image_size=32)
    assert data.num_classes == 3 and len(data.train) == 6
    assert data.train[0][0].shape == (3, 32, 32) and data.val[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize(
    "name, path, message",
    [
        ("fashion-mnist", "/nonexistent/fm", "does not exist"),
        ("imagefolder", None, "needs --data-path"),
        ("imagefolder", "/nonexistent/imagenet", "train"),
        ("mnist-digits", None, "unknown dataset"),
    ],
)
def test_missing_or_malformed_paths_give_clear_errors(name, path, message):
    with pytest.raises(DataError, match=message):
        load_dataset(name, path)


def test_a_folder_without_idx_files_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no Fashion-MNIST IDX files"):
        load_dataset("fashion-mnist", tmp_path / "empty")


def test_image_folder_with_mismatched_classes(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=1)
    (root / "val" / "class1").rename(root / "val" / "other")
    with pytest.raises(DataError, match="different class folders"):
        load_dataset("imagefolder", root)

"""In-memory image sets: whole-batch crop and flip, the held-out validation split, the training loop on them."""

import torch
from torch.nn import functional as F

from adn.vision.data import calibration_loader, load_dataset
from adn.vision.memory_data import BatchAugment, TensorImages, training_batches
from adn.training.sampling import EpochBatches


def _images(n=16, size=8):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=generator)


def test_each_augmented_image_is_a_padded_crop_of_its_source_possibly_flipped():
    images = _images()
    data = TensorImages(images, torch.arange(16), (0.0,), (1.0,), BatchAugment(padding=2, flip=True))
    out, targets = data.batch(torch.arange(16), torch.Generator().manual_seed(3))
    assert out.shape == (16, 1, 8, 8) and targets.tolist() == list(range(16))
    padded = F.pad(images.float() / 255, (2, 2, 2, 2))
    shifts, flips = set(), set()
    for i in range(16):
        matches = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.allclose(out[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, dy : dy + 8, dx : dx + 8]))
        ]
        assert matches, f"image {i} is not a crop of its padded source"
        shifts.add(matches[0][:2]), flips.add(matches[0][2])
    assert len(shifts) > 3 and flips == {False, True}  # the batch is not augmented all alike


def test_processes_taking_slices_of_a_global_batch_get_what_one_process_gets():
    data = TensorImages(_images(), torch.arange(16), (0.5,), (0.25,), BatchAugment(padding=2))
    index = torch.randperm(16)
    whole, _ = data.batch(index, torch.Generator().manual_seed(7))
    halves = [data.batch(index, torch.Generator().manual_seed(7), part)[0] for part in (slice(0, 8), slice(8, 16))]
    assert torch.equal(torch.cat(halves), whole)
    # and the augmentation is a function of the generator's seed only
    assert torch.equal(data.batch(index, torch.Generator().manual_seed(7))[0], whole)


def test_training_batches_follow_the_epoch_order_and_resume_mid_epoch():
    data = TensorImages(_images(), torch.arange(16), (0.0,), (1.0,), BatchAugment(padding=1))
    full = list(training_batches(data, EpochBatches(16, 4, seed=1, epoch=2)))
    resumed = list(training_batches(data, EpochBatches(16, 4, seed=1, epoch=2, start=2)))
    assert len(full) == 4 and len(resumed) == 2
    for (a, ta, _), (b, tb, _) in zip(full[2:], resumed):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert sorted(torch.cat([t for _, t, _ in full]).tolist()) == list(range(16))


def test_fashion_mnist_is_held_in_memory_and_matches_torchvision_transforms(fashion_dir):
    from PIL import Image
    from torchvision import transforms as T

    data = load_dataset("fashion-mnist", fashion_dir, augment=False)
    assert isinstance(data.train, TensorImages) and isinstance(data.val, TensorImages)
    image, label = data.val[3]
    pil = Image.fromarray(data.val.images[3, 0].numpy(), mode="L")
    expected = T.Compose([T.ToTensor(), T.Normalize(data.mean, data.std)])(pil)
    assert torch.allclose(image, expected, atol=1e-6) and label == int(data.val.targets[3])


def test_validation_held_out_from_training_is_fixed_disjoint_and_unaugmented(fashion_dir):
    a = load_dataset("fashion-mnist", fashion_dir, val_from_train=100, seed=1)
    b = load_dataset("fashion-mnist", fashion_dir, val_from_train=100, seed=2)
    full = load_dataset("fashion-mnist", fashion_dir, augment=False)
    assert (len(a.train), len(a.val)) == (412, 100)
    assert torch.equal(a.val.images, b.val.images)  # the same held-out images whatever the run's seed
    assert a.val.augment is None and a.train.augment is not None
    rows = {bytes(image.flatten().tolist()) for image in full.train.images}
    held = {bytes(image.flatten().tolist()) for image in a.val.images}
    kept = {bytes(image.flatten().tolist()) for image in a.train.images}
    assert held <= rows and kept <= rows and not held & kept
    assert "held out for validation" in a.description


def test_calibration_batches_are_fixed_and_unaugmented(fashion_dir):
    data = load_dataset("fashion-mnist", fashion_dir)  # training split with augmentation
    first = [x for x, _ in calibration_loader(data.train, 32, 3)]
    second = [x for x, _ in calibration_loader(data.train, 32, 3)]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, second))

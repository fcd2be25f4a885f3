"""Inputs users get wrong, fed to every command and to the public functions: each gets one clear
``adn: error: ...`` line (exit status 2) or a ValueError-family exception that says what was wrong and
what to do, and whatever was already on disk stays as it was."""

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import adn
from adn.errors import CheckpointError
from adn.utils.checkpoint_file import load_checkpoint
from adn.cli import main
from adn.errors import DataError
from adn.vision.data import load_dataset
from tests.conftest import tiny_train, write_idx, write_image_folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fashion_dir) -> Path:
    """An output folder holding a finished run, which failed commands must leave untouched."""
    out = tmp_path_factory.mktemp("finished")
    assert main(_train(fashion_dir, out)) == 0
    return out


def _fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if line.startswith("adn: error: ")]
    assert last, err[-2000:]
    for fragment in fragments:
        assert fragment in last[-1], last[-1]
    return last[-1]


def _train(fashion_dir, out, *extra) -> list[str]:
    return tiny_train(fashion_dir, out, "--val-subset", "32", "--device", "cpu", *extra, data=None)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--epochs", "0"], ["--epochs must be at least 1, got 0"]),
        (["--epochs", "-2"], ["--epochs must be at least 1, got -2"]),
        (["-b", "0"], ["--batch-size must be at least 1, got 0"]),
        (["-b", "-8"], ["--batch-size must be at least 1, got -8"]),
        (["--workers", "-1"], ["--workers must be >= 0"]),
        (["--lr", "-0.1"], ["--lr must be positive"]),
        (["--save-every-steps", "0"], ["--save-every-steps must be at least 1"]),
        (["--keep-last", "-1"], ["--keep-checkpoints (--keep-last) must be >= 0"]),
        (["--train-subset", "0"], ["--train-subset must be a positive number of images"]),
        (["--model", "resnet5O"], ["unknown model 'resnet5O'", "Did you mean", "resnet50"]),
        (["--model", "resnt20"], ["Did you mean resnet20"]),
        (["--method", "individual", "--skip", "TTFF"], ["'TTFF'", "3 stages"]),
        (["--method", "individual", "--skip", "TXF"], ["unexpected character(s) 'X'", "3 stages"]),
        (["--device", "tpu9"], ["--device 'tpu9' is not a device"]),
    ],
)
def test_train_settings_users_get_wrong(capsys, fashion_dir, finished_run, extra, fragments):
    before = _fingerprint(finished_run)
    _fails(capsys, _train(fashion_dir, finished_run, *extra), *fragments)
    assert _fingerprint(finished_run) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_gpu_that_is_not_there(capsys, fashion_dir, tmp_path):
    _fails(capsys, _train(fashion_dir, tmp_path / "run", "--device", "cuda"), "asks for a GPU", "--device cpu")


def test_resuming_from_a_missing_or_damaged_checkpoint(capsys, fashion_dir, finished_run, tmp_path):
    before = _fingerprint(finished_run)
    _fails(capsys, _train(fashion_dir, finished_run, "--resume", str(tmp_path / "nope.pt")), "does not exist")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((finished_run / "checkpoint.pt").read_bytes()[:5000])
    _fails(capsys, _train(fashion_dir, finished_run, "--resume", str(damaged)), "truncated, corrupted")
    assert _fingerprint(finished_run) == before


def test_fashion_mnist_folders_that_are_missing_empty_or_truncated(capsys, tmp_path, finished_run):
    before = _fingerprint(finished_run)
    _fails(capsys, _train(tmp_path / "missing", finished_run), "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(
        capsys, _train(tmp_path / "empty", finished_run), "holds no Fashion-MNIST IDX files", "train-images-idx3-ubyte"
    )
    broken = write_idx(tmp_path / "broken", compress=False, n_train=64, n_test=32)
    images = broken / "train-images-idx3-ubyte"
    whole = images.read_bytes()
    images.write_bytes(whole[:1000])
    _fails(capsys, _train(broken, finished_run), f"IDX files in {broken}", "truncated or corrupt")
    assert _fingerprint(finished_run) == before
    images.write_bytes(whole)  # fixed by the user: the bad copy staged earlier is not reused
    assert load_dataset("fashion-mnist", broken).train[0][0].shape == (1, 28, 28)


def test_image_folders_that_are_missing_empty_or_mislaid(capsys, tmp_path):
    run = [
        "train",
        "--model",
        "resnet18",
        "--data",
        "imagefolder",
        "--output-dir",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    _fails(capsys, run, "--data imagefolder needs --data-path")
    (tmp_path / "flat").mkdir()
    _fails(capsys, [*run, "--data-path", str(tmp_path / "flat")], "train is not a folder", "train/ and val/")
    for split in ("train", "val"):
        (tmp_path / "hollow" / split / "cats").mkdir(parents=True)
    _fails(
        capsys,
        [*run, "--data-path", str(tmp_path / "hollow")],
        "Found no valid file",
        "one sub-folder of images per class",
    )
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.fixture
def folder_with_a_corrupt_image(tmp_path) -> tuple[Path, Path]:
    root = write_image_folder(tmp_path / "images", classes=3, per_class=4, size=40)
    bad = root / "train" / "class1" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG
    return root, bad


def test_a_corrupt_image_is_named_or_skipped_and_counted(capsys, tmp_path, folder_with_a_corrupt_image):
    root, bad = folder_with_a_corrupt_image
    run = [
        "train",
        "--model",
        "resnet18",
        "--data",
        "imagefolder",
        "--data-path",
        str(root),
        "--train-crop-size",
        "32",
        "--epochs",
        "1",
        "-b",
        "4",
        "--output-dir",
        str(tmp_path / "run"),
        "--no-progress",
        "--device",
        "cpu",
    ]
    _fails(capsys, run, f"cannot read image {bad}", "--skip-bad-images")
    assert main([*run, "--skip-bad-images"]) == 0
    assert f"skipping unreadable image {bad}" in capsys.readouterr().err
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert record["train_skipped_images"] == 1 and record["steps"] == 3


def _jpeg_bytes(size: int = 16) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3)).astype(np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _index(dataset, path: Path) -> int:
    return [p for p, _ in dataset.samples].index(str(path))


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from adn.cli.analyze import load_images

    root = write_image_folder(tmp_path / "images", classes=2, per_class=1, size=16)
    ramp8 = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every gray level once
    wide, narrow = root / "val" / "class0" / "0.png", tmp_path / "8bit.png"
    Image.fromarray(ramp8.astype(np.uint16) * 257).save(wide)  # 16-bit PNG: 0..65535
    Image.fromarray(ramp8).save(narrow)
    assert Image.open(wide).mode in ("I;16", "I")
    data = load_dataset("imagefolder", root, image_size=16, augment=False)
    got = data.val[_index(data.val, wide)][0]
    assert torch.equal(got, data.val.transform(Image.fromarray(ramp8).convert("RGB")))  # was 99.6% white
    # adn analyze --gradcam reads user images through the same conversion.
    meta = {"image_size": 16, "in_channels": 1, "mean": [0.0], "std": [1.0]}
    assert torch.equal(load_images([str(wide)], meta), load_images([str(narrow)], meta))
    meta["in_channels"] = 3
    assert torch.equal(
        load_images([str(wide)], {**meta, "mean": [0.0] * 3, "std": [1.0] * 3}),
        load_images([str(narrow)], {**meta, "mean": [0.0] * 3, "std": [1.0] * 3}),
    )


def test_decoder_warnings_are_reported_once_per_file_and_truncated_jpegs_are_unreadable(capsys, tmp_path):
    import struct

    root = write_image_folder(tmp_path / "images", classes=2, per_class=2, size=16)
    jpeg = _jpeg_bytes()
    # A JPEG that still decodes, but whose header is damaged (a malformed MPO segment): PIL warns.
    payload = b"MPF\x00" + b"\x00" * 4 + b"garbage!"
    warned = root / "val" / "class0" / "warned.jpg"
    warned.write_bytes(jpeg[:2] + b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:])
    truncated = root / "val" / "class1" / "truncated.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    data = load_dataset("imagefolder", root, image_size=16, augment=False)
    capsys.readouterr()
    for _ in range(3):
        assert data.val[_index(data.val, warned)][0].shape == (3, 16, 16)  # used, as decoded
    err = capsys.readouterr().err
    assert err.count(f"adn: warning: image {warned} may be damaged") == 1, err
    assert "malformed MPO" in err
    with pytest.raises(
        DataError, match=r"cannot read image .*truncated\.jpg \(OSError: .*[Tt]runcated.*--skip-bad-images"
    ):
        data.val[_index(data.val, truncated)]
    skipping = load_dataset("imagefolder", root, image_size=16, augment=False, skip_bad_images=True)
    assert skipping.val[_index(skipping.val, truncated)] is None
    assert f"adn: warning: skipping unreadable image {truncated}" in capsys.readouterr().err


def test_eval_skips_and_counts_unreadable_images_when_asked(capsys, tmp_path):
    root = write_image_folder(tmp_path / "images", classes=3, per_class=4, size=20)
    run = tiny_train(
        root,
        tmp_path / "run",
        "--train-crop-size",
        "16",
        "--recalibrate-bn",
        "0",
        "--device",
        "cpu",
        data="imagefolder",
        batch=4,
    )
    assert main(run) == 0
    bad = root / "val" / "class1" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG
    evaluate = [
        "eval",
        "--checkpoint",
        str(tmp_path / "run" / "checkpoint.pt"),
        "--no-plot",
        "--no-latency",
        "--skip",
        "super,base",
    ]
    _fails(capsys, evaluate, f"cannot read image {bad}", "--skip-bad-images")
    assert main([*evaluate, "--skip-bad-images", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [row["skipped_images"] for row in rows] == [1, 1]
    assert f"skipping unreadable image {bad}" in err
    assert main([*evaluate, "--skip-bad-images"]) == 0
    assert "11 of 12 image folders validation images (1 unreadable, skipped)" in capsys.readouterr().out
    # The accuracy is that of the readable images: as if the file were not there.
    bad.unlink()
    assert main([*evaluate, "--json"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert [(r["acc1"], r["acc5"]) for r in rows] == [(r["acc1"], r["acc5"]) for r in clean]


def test_images_of_the_wrong_size_or_channel_count(capsys, tmp_path, fashion_dir, finished_run):
    _fails(
        capsys,
        ["train", "--model", "vit_b_16", "--data", "fake", "--output-dir", str(tmp_path / "run")],
        "vit_b_16 cannot process images of shape (3, 32, 32)",
        "--train-crop-size",
    )
    colour = write_image_folder(tmp_path / "colour", classes=10, per_class=1, size=28)
    before = _fingerprint(finished_run)
    _fails(
        capsys,
        [
            "eval",
            "--checkpoint",
            str(finished_run / "checkpoint.pt"),
            "--data",
            "imagefolder",
            "--data-path",
            str(colour),
            "--no-plot",
            "--no-latency",
        ],
        "cannot process images of shape (3, 224, 224)",
        "to have 1 channels",
        "same channels and size",
    )
    assert _fingerprint(finished_run) == before


def test_outputs_where_a_file_blocks_the_folder(capsys, tmp_path, fashion_dir, finished_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    checkpoint = str(finished_run / "checkpoint.pt")
    _fails(capsys, _train(fashion_dir, blocker / "run"), "cannot write to output directory")
    _fails(
        capsys,
        ["export", "--checkpoint", checkpoint, "--skip", "base", "--output", str(blocker / "export")],
        str(blocker),
    )
    # The evaluation's results are printed first; a plot that cannot be written is a warning (issue 12, item 10).
    assert (
        main(
            ["eval", "--checkpoint", checkpoint, "--plot", str(blocker / "plot.png"), "--no-latency", "--skip", "base"]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "TTT" in out and f"adn: warning: could not write the plot {blocker / 'plot.png'}" in err
    assert blocker.read_text() == "keep me"


def test_options_outside_their_choices_are_argparse_errors(capsys, fashion_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(_train(fashion_dir, tmp_path / "run", "--amp-dtype", "float8"))
    assert exit_info.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


# ----- the public functions ---------------------------------------------------------------------------------
def test_public_functions_name_what_is_wrong(tmp_path):
    net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4))
    with pytest.raises(ValueError, match="this network has 3 stages"):
        net.skip = "TTTT"
    with pytest.raises(ValueError, match="unexpected character"):
        adn.SkipConfig("TTX", 3)
    with pytest.raises(ValueError, match="Did you mean resnet56, resnet50"):
        adn.build_model("resnet5O")
    with pytest.raises(TypeError, match="Supported families"):
        adn.convert(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="must be positive"):
        adn.build_model("resnet20", num_classes=0)
    from torch.utils.data import DataLoader, TensorDataset

    from adn.vision.evaluate import evaluate_accuracy

    colour = DataLoader(TensorDataset(torch.randn(4, 3, 28, 28), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match=r"cannot process images of shape \(3, 28, 28\)"):
        evaluate_accuracy(net, colour, ["super"])


class _Planted:
    """Unpickling this would run Path.touch: code that a checkpoint must never get to execute."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_loading_a_checkpoint_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "code-ran"
    planted = tmp_path / "planted.pt"
    torch.save({"format": "adn-checkpoint", "meta": {}, "model": {}, "extra": _Planted(marker)}, planted)
    pickle.loads(pickle.dumps(_Planted(marker)))  # what an unsafe loader would do
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="truncated, corrupted or not an adn checkpoint"):
        load_checkpoint(planted)
    assert not marker.exists()

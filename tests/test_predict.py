"""What a trained checkpoint knows about its inputs and outputs (class names, preprocessing), the one
image preprocessing, and adn predict."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import adn
from adn.utils.checkpoint_file import load_checkpoint, save_checkpoint
from adn.cli import main
from adn.vision.labels import CIFAR10, CIFAR100, FASHION_MNIST, class_names, dataset_class_names
from adn.deploy.predict import Predictor
from adn.vision.preprocess import ImageError, ImageTooLarge, Preprocessing

from tests.conftest import write_image_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("predict-run")
    assert (
        main(
            [
                "train",
                "--model",
                "resnet20",
                "--width",
                "4",
                "--data",
                "fake",
                "--epochs",
                "1",
                "--max-steps-per-epoch",
                "2",
                "-b",
                "16",
                "--output-dir",
                str(run),
                "--no-progress",
                "--recalibrate-bn",
                "0",
            ]
        )
        == 0
    )
    return run


def save_png(path, pixels: np.ndarray) -> str:
    Image.fromarray(pixels).save(path)
    return str(path)


def images(folder, count: int = 2) -> list[str]:
    rng = np.random.default_rng(0)
    return [save_png(folder / f"img{i}.png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for i in range(count)]


# ----- what adn train records ----------------------------------------------------------------------------------
def test_a_trained_checkpoint_records_class_names_and_preprocessing(trained):
    meta = load_checkpoint(trained / "checkpoint.pt")["meta"]
    assert meta["class_names"] == [f"class{i}" for i in range(10)]
    # Fake data is fed as ToTensor gives it: no normalization, native size.
    assert meta["preprocess"] == {
        "image_size": 32,
        "resize_size": 32,
        "channels": 3,
        "mean": [0.0] * 3,
        "std": [1.0] * 3,
        "interpolation": "bilinear",
    }
    predictor = Predictor.from_checkpoint(trained / "checkpoint.pt")
    assert predictor.class_names == meta["class_names"] and predictor.preprocessing.input_shape == (3, 32, 32)


def test_class_names_of_each_data_set(tmp_path):
    from torchvision.datasets import FashionMNIST

    assert list(FASHION_MNIST) == FashionMNIST.classes
    assert len(CIFAR10) == 10 and len(CIFAR100) == 100 and list(CIFAR100) == sorted(CIFAR100)
    assert dataset_class_names("cifar10", None, 10)[3] == "cat"
    root = write_image_folder(tmp_path / "folders", classes=3, per_class=1, size=8)
    (root / "train" / "not-a-class.txt").write_text("a file, not a folder")
    assert dataset_class_names("imagefolder", root, 3) == ["class0", "class1", "class2"]
    assert dataset_class_names("fake", None, 4) == ["class0", "class1", "class2", "class3"]
    assert dataset_class_names("cifar10", None, 7) == [str(i) for i in range(7)]  # a mismatch: indices


def test_older_checkpoints_load_with_index_names_and_their_preprocessing(trained, tmp_path):
    data = load_checkpoint(trained / "checkpoint.pt")
    for key in ("class_names", "preprocess"):
        del data["meta"][key]
    net = adn.load(trained / "checkpoint.pt")
    save_checkpoint(tmp_path / "old.pt", net, data["meta"])
    predictor = Predictor.from_checkpoint(tmp_path / "old.pt")
    assert predictor.class_names == [str(i) for i in range(10)]
    assert predictor.preprocessing == Predictor.from_checkpoint(trained / "checkpoint.pt").preprocessing
    with pytest.raises(ValueError, match="class_names = .*expected 10 non-empty strings"):
        class_names({**data["meta"], "class_names": ["a", "b"]}, source="x.pt")
    older = {
        "in_channels": 3,
        "image_size": 224,
        "dataset": "imagefolder",
        "mean": [0.4] * 3,
        "std": [0.2] * 3,
        "config": {"val_resize_size": None, "interpolation": "bicubic"},
    }
    assert Preprocessing.from_meta(older) == Preprocessing(224, 256, 3, (0.4,) * 3, (0.2,) * 3, "bicubic")
    with pytest.raises(ValueError, match="invalid preprocessing metadata .*channels = 2"):
        Preprocessing.from_meta(
            {"preprocess": {"image_size": 8, "resize_size": 8, "channels": 2, "mean": [0, 0], "std": [1, 1]}}
        )


# ----- preprocessing -----------------------------------------------------------------------------------------
def test_preprocessing_matches_the_training_normalization(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    path = save_png(tmp_path / "gray.png", pixels)
    prep = Preprocessing(28, 28, 1, (0.2860,), (0.3530,))
    want = (torch.from_numpy(pixels).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(prep.load(path)[0], want, atol=1e-6)
    assert torch.equal(prep.load(path), prep.load((tmp_path / "gray.png").read_bytes()))  # path or bytes
    # Other sizes and channel counts are converted: RGB to gray, shorter side resized, center crop.
    wide = save_png(tmp_path / "wide.png", np.random.default_rng(2).integers(0, 256, (30, 90, 3), dtype=np.uint8))
    assert prep.load(wide).shape == (1, 28, 28)
    assert Preprocessing(16, 18, 3, (0.5,) * 3, (0.5,) * 3).load(path).shape == (3, 16, 16)


def test_unusable_images_are_named_with_what_would_work(tmp_path):
    prep = Preprocessing(28, 28, 1, (0.5,), (0.5,))
    with pytest.raises(ImageError, match=r"note.txt is not an image .*not a known image format.*PNG, JPEG"):
        (tmp_path / "note.txt").write_text("hello")
        prep.load(tmp_path / "note.txt")
    with pytest.raises(ImageError, match="no such file"):
        prep.load(tmp_path / "missing.png")
    big = io.BytesIO()
    Image.new("L", (3000, 2000)).save(big, "PNG")
    with pytest.raises(ImageTooLarge, match="3000x2000 = 6.0 Mpixels; at most 1.0"):
        prep.load(big.getvalue(), name="big.png", max_pixels=1_000_000)
    assert prep.load(big.getvalue()).shape == (1, 28, 28)  # no limit given: accepted
    strip = io.BytesIO()
    Image.new("L", (1000, 10)).save(strip, "PNG")
    with pytest.raises(ImageError, match="1000x10: an aspect ratio above 50:1"):
        prep.load(strip.getvalue(), name="strip.png")


# ----- adn predict ---------------------------------------------------------------------------------------------
def test_predict_prints_top_classes_by_name_and_matches_the_network(trained, tmp_path, capsys):
    files = images(tmp_path)
    checkpoint = str(trained / "checkpoint.pt")
    assert main(["predict", "--checkpoint", checkpoint, *files, "--skip", "TFT", "--top-k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["skip"] == "TFT" and answer["budget"] is None and len(answer["predictions"]) == 2
    predictor = Predictor.from_checkpoint(checkpoint)
    with torch.inference_mode():
        probabilities = torch.softmax(predictor.net(predictor.preprocessing.load_files(files), skip="TFT"), dim=1)
    for row, prediction, path in zip(probabilities, answer["predictions"], files):
        assert prediction["image"] == path and len(prediction["top"]) == 3
        assert [e["index"] for e in prediction["top"]] == row.topk(3).indices.tolist()
        assert all(e["class"] == f"class{e['index']}" for e in prediction["top"])
        assert prediction["top"][0]["probability"] == pytest.approx(row.max().item(), abs=1e-6)
    assert main(["predict", "--checkpoint", checkpoint, files[0]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("depth FFF (the super-net); 1 image(s) in") and f"{files[0]}: class" in out


def test_predict_at_a_budget_reads_the_depth_table(trained, tmp_path, capsys):
    files = images(tmp_path)
    checkpoint = str(trained / "checkpoint.pt")
    assert main(["predict", "--checkpoint", checkpoint, *files, "--budget-ms", "5"]) == 2
    err = capsys.readouterr().err
    assert "needs a depth table" in err and f"adn depth-table --checkpoint {checkpoint}" in err
    table = {
        "batch_sizes": [1, 8],
        "depths": [
            {"skip": s, "acc1": acc, "latency_ms": {"1": {"p50": ms, "p99": ms}, "8": {"p50": 8 * ms, "p99": 8 * ms}}}
            for s, acc, ms in (("TTT", 50.0, 1.0), ("TFF", 60.0, 2.0), ("FFF", 70.0, 4.0))
        ],
    }
    (tmp_path / "t.json").write_text(json.dumps(table))
    run = ["predict", "--checkpoint", checkpoint, *files, "--table", str(tmp_path / "t.json"), "--json"]
    # Batch of 2: TTT 2 ms, TFF 4 ms, FFF 8 ms (interpolated between batch 1 and 8).
    for budget, skip in (("4.5", "TFF"), ("100", "FFF"), ("2.5", "TTT")):
        assert main([*run, "--budget-ms", budget]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert (answer["skip"], answer["budget"]["fits"]) == (skip, True)
    assert main([*run, "--budget-ms", "0.5"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skip"] == "TTT" and "no depth of the table fits 0.5 ms" in captured.err
    (tmp_path / "t4.json").write_text(json.dumps({**table, "depths": [{**table["depths"][0], "skip": "TTTT"}]}))
    assert (
        main(
            ["predict", "--checkpoint", checkpoint, files[0], "--table", str(tmp_path / "t4.json"), "--budget-ms", "5"]
        )
        == 2
    )
    assert "not for this checkpoint's network (3 stages)" in capsys.readouterr().err


def test_predict_errors_are_one_line(trained, tmp_path, capsys):
    checkpoint = str(trained / "checkpoint.pt")
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["predict", "--checkpoint", checkpoint, str(tmp_path / "notes.txt")]) == 2
    assert "adn: error:" in (err := capsys.readouterr().err) and "notes.txt is not an image" in err
    assert main(["predict", "--checkpoint", checkpoint, str(tmp_path / "notes.txt"), "--skip", "TTXF"]) == 2
    assert "invalid skip configuration 'TTXF'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --skip and --budget-ms exclude each other
        main(["predict", "--checkpoint", checkpoint, "x.png", "--skip", "TTT", "--budget-ms", "3"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_predict_decodes_only_the_formats_allowed(trained, tmp_path, capsys, monkeypatch):
    """EPS goes to Ghostscript, other formats to rarely audited decoders: adn predict reads PNG, JPEG, WebP, BMP and
    TIFF unless --image-formats says otherwise, and recognises the others by their first bytes, never decoding."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self))
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n")
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (40, 48)).save(gif)
    checkpoint = str(trained / "checkpoint.pt")
    for path, name in ((eps, "EPS"), (gif, "GIF")):
        assert main(["predict", "--checkpoint", checkpoint, str(path)]) == 2
        err = capsys.readouterr().err
        assert f"adn: error: {path} is in {name} format, which is not accepted here" in err and "--image-formats" in err
    assert opened == []
    assert main(["predict", "--checkpoint", checkpoint, str(gif), "--image-formats", "png,gif", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["image"] == str(gif)
    assert main(["predict", "--checkpoint", checkpoint, str(gif), "--image-formats", "png,bogus"]) == 2
    assert "adn: error: --image-formats 'png,bogus': unknown format(s) BOGUS" in capsys.readouterr().err


def test_export_manifest_says_what_the_files_take_and_give(trained, tmp_path):
    from adn.deploy.export import export_subnetworks

    net = adn.load(trained / "checkpoint.pt")
    meta = load_checkpoint(trained / "checkpoint.pt")["meta"]
    export_subnetworks(net, ["TTT"], tmp_path / "out", "safetensors", torch.randn(1, 3, 32, 32), meta=meta)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["class_names"] == meta["class_names"] and manifest["preprocess"] == meta["preprocess"]


def test_analyze_reads_images_through_the_same_preprocessing(trained, tmp_path):
    from adn.cli.analyze import load_images

    files = images(tmp_path)
    meta = load_checkpoint(trained / "checkpoint.pt")["meta"]
    assert torch.equal(
        load_images(files, meta), Predictor.from_checkpoint(trained / "checkpoint.pt").preprocessing.load_files(files)
    )
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="--gradcam: .*bad.png is not an image"):
        load_images([str(tmp_path / "bad.png")], meta)

"""No wrong answer shown as if it were right: NaN outputs, negative variances and non-float tensors in weights
files, float images, and messages that blame the wrong cause (issue 24, items 8-10 and 14)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import adn
from adn.cli import main
from adn.errors import CheckpointError
from adn.utils.checkpoint_file import atomic_save, save_checkpoint
from adn.vision.init_from import init_from
from adn.vision.preprocess import ImageError, Preprocessing

META = {
    "model": "resnet20",
    "model_kwargs": {"width": 4},
    "num_classes": 10,
    "in_channels": 3,
    "image_size": 32,
    "skip_aware_norm": True,
    "method": "adn",
    "dataset": "fake",
    "config": {"seed": 0},
}


def _net():
    torch.manual_seed(0)
    return adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=3, width=4))


def _plain_state() -> dict:
    torch.manual_seed(1)
    return adn.build_model("resnet20", num_classes=10, in_channels=3, width=4).state_dict()


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("adn: error: ")]
    assert lines, err[-2000:]
    return lines[-1]


# ----- item 8: NaN is not an answer -------------------------------------------------------------------------------
def test_predict_refuses_outputs_that_overflow(tmp_path, capsys):
    net = _net()
    with torch.no_grad():
        net.fc.weight.fill_(3e38)  # finite weights, whose products overflow: inf - inf = NaN
    save_checkpoint(tmp_path / "overflow.pt", net, META)
    image = tmp_path / "shoe.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--checkpoint", str(tmp_path / "overflow.pt"), str(image), "--skip", "TTF"]) == 2
    message = _error(capsys)
    assert "NaN or infinite outputs at depth TTF" in message and str(image) in message and "--skip" in message
    assert "nan%" not in capsys.readouterr().out


def test_init_from_refuses_negative_variances(tmp_path):
    state = _plain_state()
    state["bn1.running_var"][0] = -0.5
    torch.save(state, tmp_path / "negative.pth")
    with pytest.raises(
        CheckpointError, match=r"negative batch-norm variances in 1 tensor\(s\), e.g. \['bn1.running_var'"
    ):
        init_from(_net(), tmp_path / "negative.pth", "resnet20", log=lambda message: None)


def test_import_weights_refuses_negative_variances():
    from tests.test_authors_weights import authors_state_dict
    from adn.vision.authors import import_authors_weights

    state = authors_state_dict("mobilenet_v2")
    key = next(k for k in state if k.endswith("running_var"))
    state[key] = -state[key]
    with pytest.raises(CheckpointError, match="negative batch-norm variances"):
        import_authors_weights(state, "mobilenet_v2")


# ----- item 9: integer, bool and complex tensors for float parameters ----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_init_from_refuses_non_float_tensors_by_name(tmp_path, dtype):
    state = _plain_state()
    state["conv1.weight"] = state["conv1.weight"].to(dtype)
    torch.save(state, tmp_path / "cast.pth")
    net = _net()
    before = net.conv1.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"not floating point .* conv1.weight \(" + str(dtype).split(".")[1]):
        init_from(net, tmp_path / "cast.pth", "resnet20", log=lambda message: None)
    assert torch.equal(net.conv1.weight, before)  # nothing was loaded


def test_init_from_says_when_it_converts_float_types(tmp_path):
    state = {k: v.half() if v.is_floating_point() else v for k, v in _plain_state().items()}
    torch.save(state, tmp_path / "half.pth")
    said = []
    net = _net()
    init_from(net, tmp_path / "half.pth", "resnet20", log=said.append)
    assert any("converted from float16 to float32 (exact)" in line for line in said), said
    assert torch.equal(net.conv1.weight, state["conv1.weight"].float())


# ----- item 10: float images are converted by their range --------------------------------------------------------
def test_a_float_tiff_in_0_1_is_the_image_it_shows(tmp_path):
    pixels = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    Image.fromarray(pixels, mode="F").save(tmp_path / "float.tif")
    Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(tmp_path / "same.png")
    preprocessing = Preprocessing(32, 32, 3, (0.0,) * 3, (1.0,) * 3)
    from_float = preprocessing.load(tmp_path / "float.tif")
    assert from_float.mean() > 0.3  # not all black
    assert torch.allclose(from_float, preprocessing.load(tmp_path / "same.png"), atol=1 / 255 + 1e-6)
    Image.fromarray(pixels * 255, mode="F").save(tmp_path / "float255.tif")  # a [0, 255] float image: as it is
    assert torch.allclose(preprocessing.load(tmp_path / "float255.tif"), from_float, atol=1 / 255 + 1e-6)
    Image.fromarray(pixels * 1000 - 10, mode="F").save(tmp_path / "wide.tif")
    with pytest.raises(
        ImageError, match="range from -9.8[0-9]* to .* neither within \\[0, 1\\] nor within \\[0, 255\\]"
    ):
        preprocessing.load(tmp_path / "wide.tif")


# ----- item 14: messages that name the real cause ---------------------------------------------------------------
def test_random_bytes_are_not_called_objects_other_than_tensors(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as caught:
        init_from(_net(), path, "resnet20", log=lambda message: None)
    assert "not a torch file" in str(caught.value) and "objects other than tensors" not in str(caught.value)
    path.write_bytes(b"\x80\x02" + os.urandom(4096))  # a pickle header, then garbage
    with pytest.raises(CheckpointError) as caught:
        init_from(_net(), path, "resnet20", log=lambda message: None)
    assert "corrupted or not a torch file" in str(caught.value)
    assert "objects other than tensors" not in str(caught.value)


def test_a_language_model_checkpoint_given_to_an_image_command_is_named_as_such(tmp_path, capsys):
    path = tmp_path / "lm.pt"
    atomic_save(
        {
            "format": "adn-checkpoint",
            "version": 1,
            "model": {},
            "meta": {
                "task": "causal-lm",
                "base": {"model": "smollm2", "gguf_file": None},
                "grouping": {"layers_per_stage": None, "skippable": 1, "keep_first": 1, "keep_last": 2},
            },
        },
        path,
    )
    for argv in (
        ["eval", "--checkpoint", str(path)],
        ["profile", "--checkpoint", str(path), "--no-latency"],
        ["predict", "--checkpoint", str(path), "x.png"],
    ):
        assert main(argv) == 2
        message = _error(capsys)
        assert "language model's checkpoint (written by adn train-lm)" in message and "adn eval-lm" in message, message
        assert "altered" not in message

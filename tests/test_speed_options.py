"""--amp, --channels-last and --compile train on CPU and compute what a plain run computes (within the
precision each one changes)."""

import json

import pytest
import torch

from adn.utils.checkpoint_file import load_checkpoint
from adn.training.precision import Precision
from adn.vision.train_config import TrainConfig
from adn.vision.train import train


def _run(tmp_path, fashion_dir, name, **overrides):
    values = dict(
        model="resnet20",
        width=8,
        data="fashion-mnist",
        data_path=str(fashion_dir),
        epochs=1,
        batch_size=32,
        lr=0.01,
        max_steps_per_epoch=2,
        val_subset=64,
        progress=False,
        seed=0,
        device="cpu",
        output_dir=str(tmp_path / name),
        amp=False,
        channels_last=False,
    )  # plain float32 unless overridden
    values.update(overrides)
    record = train(TrainConfig(**values))
    return record, load_checkpoint(tmp_path / name / "checkpoint.pt")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, fashion_dir):
    return _run(tmp_path_factory.mktemp("plain"), fashion_dir, "plain")


def _max_difference(a: dict, b: dict) -> float:
    return max(
        (a["model"][k].double() - b["model"][k].double()).abs().max().item()
        for k in a["model"]
        if "running" not in k and "num_batches" not in k
    )


@pytest.mark.parametrize("dtype, scaler", [("bfloat16", False), ("float16", True)])
def test_amp_trains_in_low_precision_and_keeps_float32_weights(tmp_path, fashion_dir, plain, dtype, scaler):
    record, ckpt = _run(tmp_path, fashion_dir, "amp", amp=True, amp_dtype=dtype)
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["model"].values())
    assert record["train_loss"] == pytest.approx(plain[0]["train_loss"], rel=0.02)  # 8-bit / 11-bit mantissas
    assert 0 < _max_difference(ckpt, plain[1]) < 0.01
    assert ("scaler" in ckpt) is scaler  # float16 needs loss scaling; its state is checkpointed for --resume


def test_amp_autocasts_the_forward_pass():
    precision = Precision("cpu", amp=True)  # auto: bfloat16 on CPU, no scaler
    assert precision.scaler is None and str(precision) == "bfloat16 autocast"
    with precision.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    assert Precision("cpu", amp=True, dtype="float16").scaler is not None
    with pytest.raises(ValueError, match="--amp-dtype must be one of auto, float16, bfloat16"):
        Precision("cpu", amp=True, dtype="float8")


def test_channels_last_computes_the_same_training(tmp_path, fashion_dir, plain):
    record, ckpt = _run(tmp_path, fashion_dir, "cl", channels_last=True)
    # The two layouts sum the first convolution's weight gradient (one input channel, 32 x 28 x 28 terms) in
    # different orders: its weights differ by ~2e-4 after two steps; a layout bug would differ by ~1e-1.
    assert _max_difference(ckpt, plain[1]) < 1e-3
    assert record["train_loss"] == pytest.approx(plain[0]["train_loss"], rel=1e-5)


def test_channels_last_refuses_the_layer_torch_crashes_on(tmp_path, fashion_dir):
    # torch 2.14.1 corrupts memory in the CPU backward of strided 1x1 convolutions with < 8 input
    # channels in channels-last; a clear refusal beats a segmentation fault.
    with pytest.raises(ValueError, match=r"layer2.0.downsample.0 is a strided 1x1 convolution with 4 input channels"):
        _run(tmp_path, fashion_dir, "cl4", width=4, channels_last=True)
    assert not (tmp_path / "cl4" / "checkpoint.pt").exists()


def test_compile_traces_one_graph_per_depth_and_trains_the_same(tmp_path, fashion_dir, plain):
    import torch._dynamo

    torch._dynamo.reset()
    # The "eager" backend runs dynamo's tracing and guards (what --compile changes for adn: the depth
    # switches, the stage hooks) without inductor's minutes of C++ compilation on a CPU.
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # reset() keeps counters: earlier tests count
    record, ckpt = _run(tmp_path, fashion_dir, "compiled", compile=True, compile_backend="eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    torch._dynamo.reset()
    assert 2 <= graphs <= 4  # super-net and base-net, in training and in evaluation: no recompiling every step
    assert _max_difference(ckpt, plain[1]) < 1e-5
    assert json.loads((tmp_path / "compiled" / "log.jsonl").read_text())["val_acc1_base"] == plain[0]["val_acc1_base"]


@pytest.mark.parametrize("native", [True, False])
def test_precision_and_layout_default_to_the_fastest_the_hardware_supports(
    tmp_path, fashion_dir, monkeypatch, native, capsys
):
    import adn.vision.train_setup

    monkeypatch.setattr(adn.vision.train_setup, "native_bfloat16", lambda device: native)
    _run(tmp_path, fashion_dir, "auto", amp=None, channels_last=None)
    ckpt = load_checkpoint(tmp_path / "auto" / "checkpoint.pt")
    assert ckpt["meta"]["speed"] == {"amp": native, "channels_last": native}
    err = capsys.readouterr().err
    assert ("bfloat16 autocast, channels-last" if native else "float32") in err
    assert "chosen automatically" in err and "--no-amp" in err
    # explicit flags win over the automatic choice
    _run(tmp_path, fashion_dir, "explicit", amp=False, channels_last=None)
    assert load_checkpoint(tmp_path / "explicit" / "checkpoint.pt")["meta"]["speed"] == {
        "amp": False,
        "channels_last": False,
    }


def test_automatic_channels_last_avoids_the_layer_torch_crashes_on(tmp_path, fashion_dir, monkeypatch, capsys):
    import adn.vision.train_setup

    monkeypatch.setattr(adn.vision.train_setup, "native_bfloat16", lambda device: True)
    _run(tmp_path, fashion_dir, "auto4", width=4, amp=None, channels_last=None)  # would crash in channels-last
    assert load_checkpoint(tmp_path / "auto4" / "checkpoint.pt")["meta"]["speed"] == {
        "amp": True,
        "channels_last": False,
    }
    assert "channels-last off: layer2.0.downsample.0" in capsys.readouterr().err

"""``adn train --init-from FILE``: the four kinds of file, the head swap, errors, and the starting point."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

import adn
from adn.errors import CheckpointError
from adn.vision.checkpoint import load_network
from adn.cli import main
from adn.training.distributed import setup as setup_distributed
from adn.vision.init_from import head_module, init_from, read_init_file
from adn.core.layers import SkipAwareNorm
from adn.vision.train import Trainer, train
from adn.vision.train_config import TrainConfig


def _config(tmp_path, name="run", **overrides) -> TrainConfig:
    values = dict(
        model="resnet20",
        width=8,
        data="fake",
        output_dir=str(tmp_path / name),
        epochs=1,
        batch_size=16,
        max_steps_per_epoch=1,
        val_subset=16,
        recalibrate_bn=0,
        lr=0.05,
        progress=False,
        device="cpu",
        amp=False,
        channels_last=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _plain(name="resnet20", num_classes=10, seed=1, **kwargs) -> torch.nn.Module:
    """A plain network with weights unlike a fresh build's (another seed, non-trivial norm statistics)."""
    torch.manual_seed(seed)
    model = adn.build_model(name, num_classes=num_classes, in_channels=3, **kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 1.5)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    return model


def _starting_network(cfg: TrainConfig) -> torch.nn.Module:
    """The network a run starts training from (built as adn train builds it, nothing trained)."""
    world, device = setup_distributed(cfg.device)
    trainer = Trainer(cfg, world, device)
    try:
        return trainer.net
    finally:
        trainer.close()
        world.close()


def _assert_plain_weights_with_twin_copies(net, plain_state: dict, skip_keys=()) -> None:
    own = net.state_dict()
    for key, value in plain_state.items():
        if key not in skip_keys:
            assert torch.equal(own[key], value), key
    for name, module in net.named_modules():
        if isinstance(module, SkipAwareNorm):
            for key, value in module.twin.state_dict().items():
                assert torch.equal(value, plain_state[f"{name}.{key}"]), f"{name}.twin.{key} is not a copy of its norm"


# ----- the four kinds of file ----------------------------------------------------------------------------------
def test_torchvision_style_state_dict_is_the_starting_point(tmp_path):
    plain = _plain(width=8)
    path = tmp_path / "resnet20.pth"
    torch.save(plain.state_dict(), path)
    net = _starting_network(_config(tmp_path, init_from=str(path)))
    _assert_plain_weights_with_twin_copies(net, plain.state_dict())


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    plain = _plain(width=8)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    net = _starting_network(_config(tmp_path, init_from=str(path)))
    _assert_plain_weights_with_twin_copies(net, plain.state_dict())


def test_timm_checkpoint_with_training_arguments(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    model = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "model_best.pth.tar"  # what timm's train.py writes: weights under state_dict, args a Namespace
    torch.save(
        {
            "epoch": 7,
            "arch": "resnet18",
            "state_dict": model.state_dict(),
            "args": argparse.Namespace(lr=0.1, model="resnet18"),
        },
        path,
    )
    assert read_init_file(path).kind == "checkpoint ('state_dict' entry)"
    net = _starting_network(_config(tmp_path, model="timm/resnet18", width=None, init_from=str(path)))
    _assert_plain_weights_with_twin_copies(net, model.state_dict())


def test_individual_adn_checkpoint_gives_each_norm_the_one_its_depth_used(tmp_path):
    # an individual base-depth run trains the twins of shared norms (its stages all skip) and not the norms
    first = _config(tmp_path, "individual", method="individual", skip="base", seed=2)
    train(first)
    trained, _ = load_network(Path(first.output_dir) / "checkpoint.pt")
    net = _starting_network(_config(tmp_path, init_from=str(Path(first.output_dir) / "checkpoint.pt")))
    state, source = net.state_dict(), trained.state_dict()
    for name, module in net.named_modules():
        if isinstance(module, SkipAwareNorm):
            for key in module.twin.state_dict():
                assert torch.equal(state[f"{name}.{key}"], source[f"{name}.twin.{key}"]), f"{name}.{key}"
                assert torch.equal(state[f"{name}.twin.{key}"], source[f"{name}.twin.{key}"])
    assert torch.equal(state["conv1.weight"], source["conv1.weight"])


def test_converted_adn_checkpoint_loads_its_twins_too(tmp_path):
    first = _config(tmp_path, "adn-run", seed=2)
    train(first)
    trained, _ = load_network(Path(first.output_dir) / "checkpoint.pt")
    assert any(not torch.equal(m.weight, m.twin.weight) for m in trained.modules() if isinstance(m, SkipAwareNorm))
    net = _starting_network(_config(tmp_path, init_from=str(Path(first.output_dir) / "checkpoint.pt")))
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())


# ----- head, mismatch, safety ----------------------------------------------------------------------------------
def test_head_with_another_class_count_is_replaced_and_said(tmp_path, capsys):
    plain = _plain(num_classes=7, width=8)
    path = tmp_path / "seven.pth"
    torch.save(plain.state_dict(), path)
    cfg = _config(tmp_path, init_from=str(path))
    torch.manual_seed(cfg.seed)
    fresh = adn.build_model("resnet20", num_classes=10, in_channels=3, width=8)  # the head the run draws
    net = _starting_network(cfg)
    assert "replaced the classification head fc (7 classes in the file, 10 in the data set)" in capsys.readouterr().err
    _assert_plain_weights_with_twin_copies(net, plain.state_dict(), skip_keys={"fc.weight", "fc.bias"})
    assert torch.equal(net.fc.weight, fresh.fc.weight) and net.fc.out_features == 10


def test_file_that_does_not_fit_names_keys_and_shapes(tmp_path, capsys):
    path = tmp_path / "wide.pth"
    torch.save(_plain(width=16).state_dict(), path)
    code = main(["train", *_cli_args(tmp_path), "--init-from", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit --model resnet20" in err and "conv1.weight: model (8, 3, 3, 3), file (16, 3, 3, 3)" in err
    assert "--width" in err  # how to fix it
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(
        CheckpointError, match=r"missing from the file, first \['conv1.weight'.*lacks, first \['encoder.weight'\]"
    ):
        init_from(adn.convert(_plain(width=8)), other, "resnet20", log=lambda _: None)


class _Payload:
    def __reduce__(self):
        return (exec, (f"open({str(MARKER)!r}, 'w').write('ran')",))


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"adn-init-from-marker-{os.getpid()}"


def test_pickled_code_is_refused_and_never_runs(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    state = _plain(width=8).state_dict()
    torch.save({**state, "extra": _Payload()}, path)
    code = main(["train", *_cli_args(tmp_path), "--init-from", str(path)])
    assert code == 2
    assert "holds objects other than tensors" in capsys.readouterr().err
    assert not MARKER.exists()


def _cli_args(tmp_path) -> list[str]:
    return [
        "--model",
        "resnet20",
        "--width",
        "8",
        "--data",
        "fake",
        "--epochs",
        "1",
        "-b",
        "16",
        "--max-steps-per-epoch",
        "1",
        "--val-subset",
        "16",
        "--recalibrate-bn",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-amp",
        "--output-dir",
        str(tmp_path / "cli-run"),
    ]


def test_exclusive_with_weights_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        _config(tmp_path, init_from="x.pth", weights="DEFAULT", model="resnet18").validate()
    with pytest.raises(ValueError, match="no such file"):
        _config(tmp_path, init_from=str(tmp_path / "missing.pth")).validate()


# ----- training from it ----------------------------------------------------------------------------------------
def test_one_step_starts_from_the_loaded_weights_and_body_trains_slower(tmp_path, capsys):
    plain = _plain(num_classes=7, width=8)
    path = tmp_path / "seven.pth"
    torch.save(plain.state_dict(), path)
    cfg = _config(
        tmp_path,
        init_from=str(path),
        opt="sgd",
        momentum=0.0,
        weight_decay=0.0,
        body_lr_scale=0.1,
        lr_scheduler="constant",
    )
    world, device = setup_distributed(cfg.device)
    trainer = Trainer(cfg, world, device)
    try:
        before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
        _assert_plain_weights_with_twin_copies(trainer.net, plain.state_dict(), skip_keys={"fc.weight", "fc.bias"})
        groups = trainer.optimizer.param_groups
        head = {id(p) for p in head_module(trainer.net)[1].parameters()}
        assert [g["lr"] for g in groups if any(id(p) in head for p in g["params"])] == [0.05]
        body = [g["lr"] for g in groups if not any(id(p) in head for p in g["params"])]
        assert body and body == pytest.approx([0.005] * len(body))
        trainer.run()
        after = trainer.net.state_dict()
        assert not torch.equal(after["conv1.weight"], before["conv1.weight"])  # it trained, from the file's weights
    finally:
        trainer.close()
        world.close()
    assert "initialized from" in capsys.readouterr().err
    # resuming keeps the body's lower learning rate
    resumed = _config(
        tmp_path,
        init_from=str(path),
        body_lr_scale=0.1,
        lr_scheduler="constant",
        opt="sgd",
        momentum=0.0,
        weight_decay=0.0,
        epochs=2,
        resume=str(Path(cfg.output_dir) / "checkpoint.pt"),
    )
    world, device = setup_distributed(resumed.device)
    trainer = Trainer(resumed, world, device)
    try:
        assert sorted(g["lr"] for g in trainer.optimizer.param_groups)[0] == pytest.approx(0.005)
    finally:
        trainer.close()
        world.close()

import copy
import json

import pytest
import torch

import adn
from adn.core.depth_statistics import load_depth_statistics
from adn.errors import CheckpointError
from adn.utils.checkpoint_file import load_checkpoint
from adn.vision.checkpoint import load_network
from adn.vision.train_config import TrainConfig
from adn.errors import TrainingDiverged
from adn.vision.train import train


def _config(tmp_path, fashion_dir, **overrides) -> TrainConfig:
    values = dict(
        model="resnet20",
        width=4,
        data="fashion-mnist",
        data_path=str(fashion_dir),
        output_dir=str(tmp_path / "run"),
        epochs=1,
        batch_size=32,
        lr=0.05,
        progress=False,
        seed=0,
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def _log(cfg: TrainConfig) -> list[dict]:
    with open(f"{cfg.output_dir}/log.jsonl") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize(
    "method, extra",
    [
        ("adn", {}),
        ("adn", {"feature_kd": "pooled"}),
        ("adn", {"skip_aware_norm": False}),
        ("joint", {}),
        ("individual", {"skip": "base"}),
    ],
)
def test_each_method_learns_on_tiny_data(tmp_path, fashion_dir, method, extra):
    cfg = _config(tmp_path, fashion_dir, method=method, epochs=6, **extra)
    train(cfg)
    log = _log(cfg)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["train_loss"] < 0.7 * log[0]["train_loss"]
    # The trained (or teacher) sub-network is well above chance (10%) after a few epochs.
    main = "val_acc1_base" if method == "individual" else "val_acc1_super"
    assert log[-1][main] > 30.0
    if method == "adn":
        assert {"train_ce_super", "train_kd_features", "train_kd_logits", "val_acc1_super", "val_acc1_base"} <= set(
            log[0]
        )
    if method == "individual":
        # its own depth only, with the running and with recalibrated batch-norm statistics
        assert set(k for k in log[0] if k.startswith("val_acc1")) == {"val_acc1_base", "val_acc1_base_recal"}
        assert load_checkpoint(f"{cfg.output_dir}/checkpoint.pt")["meta"]["trained_skip"] == "base"


def test_base_pass_leaves_running_stats_of_untwinned_norms_to_the_super_net():
    from adn.core.distill import SubPathDistillationLoss
    from adn.training.methods import adn_step, single_norms

    net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4)).train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    state = copy.deepcopy(net.state_dict())
    names = [n for n, m in net.named_modules() if any(m is k for k in single_norms(net))]
    assert "bn1" in names and "layer2.0.downsample.1" in names and not any("twin" in n for n in names)
    with torch.no_grad():
        net(x, skip="FFF")
    super_only = [m.running_mean.clone() for m in single_norms(net)]

    net.load_state_dict(state)
    adn_step(net, x, y, SubPathDistillationLoss(), bn_stats_from="super")
    assert all(torch.allclose(a, m.running_mean) for a, m in zip(super_only, single_norms(net)))

    net.load_state_dict(state)
    adn_step(net, x, y, SubPathDistillationLoss(), bn_stats_from="both")
    # The base pass adds a second update to the shortcut norms, whose input differs between depths.
    assert any(not torch.allclose(a, m.running_mean) for a, m in zip(super_only, single_norms(net)))


def test_checkpoint_round_trips_every_subnetwork(tmp_path, fashion_dir):
    cfg = _config(tmp_path, fashion_dir, max_steps_per_epoch=3)
    train(cfg)
    net, ckpt = load_network(f"{cfg.output_dir}/checkpoint.pt")
    assert ckpt["meta"]["model"] == "resnet20" and ckpt["epoch"] == 0
    # Rebuild the trained network independently: same weights (and, for the default joint training, the
    # per-depth batch-norm statistics the run stored at its end), same outputs at every depth.
    reference = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4))
    saved = torch.load(f"{cfg.output_dir}/checkpoint.pt", weights_only=True)
    reference.load_state_dict(saved["model"])
    load_depth_statistics(reference, saved["depth_statistics"])
    x = torch.randn(3, 1, 28, 28)
    net.eval(), reference.eval()
    with torch.no_grad():
        for config in adn.SkipConfig.all(3):
            assert torch.allclose(net(x, skip=config), reference(x, skip=config))


def test_resume_continues_from_the_saved_epoch(tmp_path, fashion_dir):
    first = _config(tmp_path, fashion_dir, epochs=1, max_steps_per_epoch=4)
    train(first)
    resumed = _config(
        tmp_path, fashion_dir, epochs=2, max_steps_per_epoch=4, resume=f"{first.output_dir}/checkpoint.pt"
    )
    train(resumed)
    assert [r["epoch"] for r in _log(first)] == [1, 2]
    assert load_checkpoint(f"{first.output_dir}/checkpoint.pt")["epoch"] == 1

    # The resumed run ends where an uninterrupted two-epoch run ends.
    straight = _config(tmp_path, fashion_dir, epochs=2, max_steps_per_epoch=4, output_dir=str(tmp_path / "straight"))
    train(straight)
    a = load_checkpoint(f"{first.output_dir}/checkpoint.pt")["model"]
    b = load_checkpoint(f"{straight.output_dir}/checkpoint.pt")["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_resume_refuses_a_checkpoint_of_another_setup(tmp_path, fashion_dir):
    first = _config(tmp_path, fashion_dir, max_steps_per_epoch=2)
    train(first)
    other = _config(
        tmp_path,
        fashion_dir,
        model="resnet32",
        epochs=2,
        resume=f"{first.output_dir}/checkpoint.pt",
        output_dir=str(tmp_path / "other"),
    )
    with pytest.raises(CheckpointError, match="model='resnet20'"):
        train(other)


def test_diverging_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, fashion_dir):
    cfg = _config(tmp_path, fashion_dir, max_steps_per_epoch=2)
    train(cfg)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    bad = _config(tmp_path, fashion_dir, epochs=2, lr=1e30, resume=f"{cfg.output_dir}/checkpoint.pt")
    with pytest.raises(TrainingDiverged, match="step"):
        train(bad)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epochs", 0, "--epochs"),
        ("batch_size", -1, "--batch-size"),
        ("method", "magic", "--method"),
        ("feature_kd", "x", "--feature-kd"),
        ("alpha", 2.0, "--alpha"),
    ],
)
def test_bad_settings_fail_before_anything_is_written(tmp_path, fashion_dir, field, value, message):
    cfg = _config(tmp_path, fashion_dir, **{field: value})
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()

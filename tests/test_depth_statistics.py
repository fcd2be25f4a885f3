"""Per-depth batch-norm statistics: every depth normalizes with statistics measured at that depth, wherever
it is run (per call, default depth, threads, standalone sub-networks, checkpoints), and training is
untouched by them."""

import copy
import json
import threading

import pytest
import torch
from safetensors.torch import load_file

import adn
from adn.errors import CheckpointError
from adn.vision.checkpoint import load_network
from adn.cli import main
from adn.core.recalibrate import norm_state
from tests.conftest import tiny_train

from .test_recalibrate import _batches, _trained_net

DEPTHS = [str(c) for c in adn.SkipConfig.all(3)]


def _reference(net, config, batches=None, num_batches=3):
    """What the depth computes with its statistics recalibrated in a plain copy of the network."""
    plain = copy.deepcopy(net)
    adn.drop_depth_statistics(plain)
    adn.recalibrate_norms(plain, batches or _batches(), num_batches, skip=config)
    return plain.eval()


def test_every_depth_uses_the_statistics_measured_at_that_depth():
    net = _trained_net()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        running = {c: net(x, skip=c) for c in DEPTHS}
        saved = norm_state(net)
        assert adn.record_depth_statistics(net, _batches(), num_batches=3) == 96
        for config in DEPTHS:
            expected = _reference(net, config)(x, skip=config)
            assert torch.allclose(net(x, skip=config), expected, atol=1e-5), config
        assert not torch.allclose(net(x, skip="TFT"), running["TFT"], atol=1e-3)  # the statistics did change
        net.skip = "FTT"  # the default depth
        assert torch.allclose(net(x), _reference(net, "FTT")(x, skip="FTT"), atol=1e-5)
        with net.skipping("TTT"):
            assert torch.allclose(net(x), _reference(net, "TTT")(x, skip="TTT"), atol=1e-5)
    # The running statistics, which training continues from, are left as they were.
    assert all(torch.equal(a[k], b[k]) for a, b in zip(saved, norm_state(net)) for k in a)


def test_threads_running_different_depths_each_read_their_own_statistics():
    net = _trained_net()
    adn.record_depth_statistics(net, _batches(), num_batches=3)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = {c: _reference(net, c)(x, skip=c) for c in ("FFF", "TFT", "TTT")}
    results, errors = {}, []

    def work(config):
        try:
            with torch.no_grad():
                outs = [net(x, skip=config) for _ in range(20)]
            results[config] = all(torch.allclose(o, expected[config], atol=1e-5) for o in outs)
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(c,)) for c in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {c: True for c in expected}


def test_training_mode_ignores_them_and_state_dict_is_unchanged():
    net = _trained_net()
    twin = copy.deepcopy(net)
    keys = set(net.state_dict())
    adn.record_depth_statistics(net, _batches(), num_batches=2)
    assert set(net.state_dict()) == keys  # resuming and --init-from never see them
    x = torch.randn(16, 1, 28, 28)
    net.train(), twin.train()
    assert torch.equal(net(x, skip="TFT"), twin(x, skip="TFT"))  # batch statistics, as before


def test_standalone_subnetworks_carry_their_depths_statistics():
    net = _trained_net()
    adn.record_depth_statistics(net, _batches(), num_batches=3)
    x = torch.randn(4, 1, 28, 28)
    for config in ("TFT", "TTT"):
        sub = net.subnet(config).eval()
        assert not any("depth_running" in name for name, _ in sub.named_buffers())
        assert type(sub.bn1) is torch.nn.BatchNorm2d
        with torch.no_grad():
            assert torch.allclose(sub(x), net(x, skip=config), atol=1e-5)
    folded = net.subnet("TFT", fold_bn=True)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x, skip="TFT"), atol=1e-4)


def test_dropping_them_restores_the_running_statistics():
    net = _trained_net()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = net(x, skip="TFT")
        adn.record_depth_statistics(net, _batches(), num_batches=2)
        adn.drop_depth_statistics(net)
        assert torch.equal(net(x, skip="TFT"), before)
    assert all(
        type(m) is not adn.core.layers.DepthStatisticsNorm and "depth_running" not in dict(m.named_buffers())
        for m in net.modules()
    )


def test_a_failed_measurement_leaves_the_network_as_it_was():
    net = _trained_net()
    with pytest.raises(ValueError, match="no batches"):
        adn.record_depth_statistics(net, [], num_batches=2)
    assert "adn_depth_statistics" not in net.__dict__
    assert not any(isinstance(m, adn.core.layers.DepthStatisticsNorm) for m in net.modules())


def test_recording_some_depths_keeps_the_rows_of_the_others():
    net = _trained_net()
    x = torch.randn(4, 1, 28, 28)
    adn.record_depth_statistics(net, _batches(), num_batches=3, configs=["TTT"])
    with torch.no_grad():
        deepest = net(x, skip="TTT")
    adn.record_depth_statistics(net, _batches(), num_batches=3, configs=["FFF", "TFT"])
    with torch.no_grad():
        assert torch.equal(net(x, skip="TTT"), deepest)
        assert torch.allclose(net(x, skip="TFT"), _reference(net, "TFT")(x, skip="TFT"), atol=1e-5)
    assert "measured for 3 of 8 depths" in adn.core.depth_statistics.statistics_in_use(net)


def test_changed_weights_make_the_network_warn_and_use_its_running_statistics():
    net = _trained_net()
    adn.record_depth_statistics(net, _batches(), num_batches=3)
    copied = copy.deepcopy(net)  # a copy of the same weights keeps using the rows
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(copied(x, skip="TFT"), net(x, skip="TFT"))
    other = _trained_net(steps=4)
    net.load_state_dict(other.state_dict())
    with pytest.warns(UserWarning, match="weights changed"), torch.no_grad():
        assert torch.equal(net(x, skip="TFT"), other(x, skip="TFT"))
    assert adn.core.depth_statistics.statistics_in_use(net) == "running"


def test_recalibrating_one_depth_updates_its_row():
    net = _trained_net()
    adn.record_depth_statistics(net, _batches(), num_batches=3)
    x = torch.randn(4, 1, 28, 28)
    adn.recalibrate_norms(net, _batches(2, seed=7), num_batches=2, skip="TFT")
    with torch.no_grad():
        assert torch.allclose(
            net(x, skip="TFT"), _reference(net, "TFT", _batches(2, seed=7), 2)(x, skip="TFT"), atol=1e-5
        )


def test_norms_that_do_more_than_normalize_keep_doing_it():
    timm = pytest.importorskip("timm")
    net = adn.convert(timm.create_model("mobilenetv2_050", num_classes=10)).eval()  # BatchNormAct2d: norm + ReLU6
    batches = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    adn.record_depth_statistics(net, batches, num_batches=2, configs=["super", "base"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for config in ("super", "base"):
            assert torch.allclose(
                net(x, skip=config), _reference(net, config, batches, 2)(x, skip=config), atol=1e-4
            ), config


def test_networks_without_batch_norm_have_nothing_to_record():
    net = adn.convert(adn.build_model("vit_small_images", num_classes=10, in_channels=1, image_size=28))
    assert adn.record_depth_statistics(net, _batches(1), num_batches=1) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_dir):
    out = tmp_path_factory.mktemp("depthstats") / "run"
    assert (
        main(tiny_train(fashion_dir, out, "--lr", "0.5", "--method", "adn", "--recalibrate-bn", "0", steps=6, width=8))
        == 0
    )
    return out / "checkpoint.pt"  # (Algorithm 1: no per-depth statistics until adn recalibrate stores them)


def test_recalibrate_command_stores_them_and_every_command_reads_them(trained, tmp_path, capsys):
    target = tmp_path / "recalibrated.pt"
    original = trained.read_bytes()
    assert (
        main(
            [
                "recalibrate",
                "--checkpoint",
                str(trained),
                "--output",
                str(target),
                "--batches",
                "2",
                "-b",
                "64",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["depths"] == 8 and summary["images_per_depth"] == 128
    assert trained.read_bytes() == original  # --output: the input is not touched

    net, _ = load_network(target)
    assert adn.core.depth_statistics.has_depth_statistics(net)
    x = torch.randn(4, 1, 28, 28)
    loaded = adn.load(target)
    with torch.no_grad():
        assert torch.equal(loaded(x, skip="TFT"), net.eval()(x, skip="TFT"))

    eval_args = ["eval", "--no-latency", "--no-plot", "--json", "--skip", "TFT,TTT"]
    assert main(eval_args + ["--checkpoint", str(target)]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert [r["bn_statistics"] for r in stored] == ["per depth (128 training images each, adn recalibrate)"] * 2
    # The same numbers as recalibrating on the fly with the same batches.
    assert main(eval_args + ["--checkpoint", str(trained), "--recalibrate-bn", "2", "-b", "64"]) == 0
    on_the_fly = json.loads(capsys.readouterr().out)
    assert [r["acc1"] for r in stored] == [r["acc1"] for r in on_the_fly]
    # Recalibrating a checkpoint that has them measures afresh (the stored rows are set aside meanwhile).
    assert main(eval_args + ["--checkpoint", str(target), "--recalibrate-bn", "1", "-b", "64"]) == 0
    afresh = json.loads(capsys.readouterr().out)
    assert main(eval_args + ["--checkpoint", str(trained), "--recalibrate-bn", "1", "-b", "64"]) == 0
    assert [r["acc1"] for r in afresh] == [r["acc1"] for r in json.loads(capsys.readouterr().out)]
    assert [r["bn_statistics"] for r in afresh] == ["recalibrated (1 batches)"] * 2

    assert main(["export", "--checkpoint", str(target), "--skip", "TFT", "--output", str(tmp_path / "x")]) == 0
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["batch_norm_statistics"] == "per depth (128 training images each, adn recalibrate)"
    tensors = load_file(tmp_path / "x" / "subnet_TFT.safetensors")
    row = adn.SkipConfig("TFT").index
    twin = net.get_submodule("layer3.0.bn1.twin")  # TFT and TTT both skip stage 3 and differ before it
    assert torch.equal(tensors["layer3.0.bn1.running_mean"], twin.depth_running_mean[row])
    assert not torch.equal(twin.depth_running_mean[row], twin.depth_running_mean[adn.SkipConfig("TTT").index])


def test_damaged_stored_statistics_are_refused_and_the_fix_works(trained, tmp_path):
    target = tmp_path / "bad.pt"
    assert main(["recalibrate", "--checkpoint", str(trained), "--output", str(target), "--batches", "1"]) == 0
    data = torch.load(target, weights_only=True)
    name = next(iter(data["depth_statistics"]["norms"]))
    data["depth_statistics"]["norms"][name]["var"] = -data["depth_statistics"]["norms"][name]["var"] - 1
    torch.save(data, target)
    with pytest.raises(CheckpointError, match=r"expected finite values of shape \(8, .*adn recalibrate"):
        load_network(target)
    assert main(["recalibrate", "--checkpoint", str(target), "--batches", "1"]) == 0  # the fix the message names
    assert adn.core.depth_statistics.has_depth_statistics(load_network(target)[0])


def test_a_joint_network_without_them_gets_a_note_naming_the_fix(tmp_path, fashion_dir, capsys):
    out = tmp_path / "joint"  # (told not to store them: adn train stores them itself by default)
    joint = tiny_train(fashion_dir, out, "--method", "joint", "--no-depth-statistics", "--recalibrate-bn", "0", steps=2)
    assert main(joint) == 0
    checkpoint = str(out / "checkpoint.pt")
    assert f"next: adn recalibrate --checkpoint {checkpoint}" in capsys.readouterr().err
    eval_args = ["eval", "--checkpoint", checkpoint, "--no-latency", "--no-plot", "--skip", "TFT", "--json"]
    assert main(eval_args) == 0
    assert f"adn recalibrate --checkpoint {checkpoint}" in capsys.readouterr().err
    assert main(["recalibrate", "--checkpoint", checkpoint, "--batches", "1", "-b", "16"]) == 0  # in place
    capsys.readouterr()
    assert main(eval_args) == 0
    assert "adn recalibrate" not in capsys.readouterr().err


def test_a_joint_network_without_twins_needs_no_note(tmp_path, fashion_dir, capsys):
    # without skip-aware twins the running statistics serve every depth (docs/reproduction.md), so neither
    # train nor eval should send the user to adn recalibrate
    out = tmp_path / "joint-no-san"
    joint = tiny_train(fashion_dir, out, "--method", "joint", "--no-skip-aware-norm", "--recalibrate-bn", "0", steps=2)
    assert main(joint) == 0
    assert "adn recalibrate" not in capsys.readouterr().err
    assert (
        main(
            ["eval", "--checkpoint", str(out / "checkpoint.pt"), "--no-latency", "--no-plot", "--skip", "TFT", "--json"]
        )
        == 0
    )
    assert "adn recalibrate" not in capsys.readouterr().err

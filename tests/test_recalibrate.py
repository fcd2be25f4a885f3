"""Norm recalibration: each sub-network's batch-norm statistics recomputed from training batches."""

import json

import pytest
import torch

import adn
from adn.cli import main
from adn.vision.evaluate import evaluate_accuracy
from adn.core.recalibrate import batch_norms, norm_state


def _trained_net(steps=3):
    torch.manual_seed(0)
    net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4)).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(steps):  # a high learning rate: the running statistics lag the weights
        for skip in ("super", "base"):
            x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x, skip=skip), y).backward()
            optimizer.step()
    return net.eval()


def _batches(n=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(32, 1, 28, 28, generator=generator) * 2 + 1, torch.zeros(32, dtype=torch.long)) for _ in range(n)
    ]


def test_statistics_become_the_exact_average_over_the_calibration_batches():
    net, batches = _trained_net(), _batches()
    assert adn.recalibrate_norms(net, batches, num_batches=3, skip="super") == 96
    with torch.no_grad():
        means = [net.bn1(net.conv1(x)).mean() for x, _ in batches]  # eval mode now: output irrelevant
        conv = [net.conv1(x) for x, _ in batches]
    expected_mean = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv]).mean(0)
    assert torch.allclose(net.bn1.running_mean, expected_mean, atol=1e-5)
    assert not net.training and all(not m.training for m in net.modules())
    assert net.bn1.momentum == 0.1  # restored
    del means


def test_only_the_norms_a_depth_runs_are_recalibrated():
    net = _trained_net()
    twins = [m.twin for m in net.modules() if isinstance(m, adn.SkipAwareNorm)]
    own = [m for m in net.modules() if isinstance(m, adn.SkipAwareNorm)]
    before_twins = [t.running_mean.clone() for t in twins]
    before_own = [m.running_mean.clone() for m in own]
    adn.recalibrate_norms(net, _batches(), num_batches=2, skip="super")  # the super-net uses no twin
    assert all(torch.equal(t.running_mean, b) for t, b in zip(twins, before_twins))
    assert not all(torch.equal(m.running_mean, b) for m, b in zip(own, before_own))
    adn.recalibrate_norms(net, _batches(), num_batches=2, skip="base")  # the base-net uses every twin
    assert not any(torch.equal(t.running_mean, b) for t, b in zip(twins, before_twins))


def test_recalibrated_evaluation_is_deterministic_and_leaves_the_network_unchanged():
    net = _trained_net()
    state = norm_state(net)
    test = _batches(2, seed=5)
    plain = evaluate_accuracy(net, test, adn.SkipConfig.all(3))
    first = evaluate_accuracy(net, test, adn.SkipConfig.all(3), recalibrate=(_batches(), 3))
    second = evaluate_accuracy(net, test, adn.SkipConfig.all(3), recalibrate=(_batches(), 3))
    assert first == second and set(first) == set(plain)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(state, norm_state(net)) for k in a)
    assert evaluate_accuracy(net, test, adn.SkipConfig.all(3)) == plain


def test_networks_without_batch_norm_have_nothing_to_recalibrate():
    net = adn.convert(adn.build_model("vit_small_images", num_classes=10, in_channels=1, image_size=28))
    assert not batch_norms(net)
    assert adn.recalibrate_norms(net, _batches(1), num_batches=1) == 0


def test_bad_arguments_are_refused():
    net = _trained_net(1)
    with pytest.raises(ValueError, match="at least 1 batch"):
        adn.recalibrate_norms(net, _batches(), num_batches=0)
    with pytest.raises(ValueError, match="no batches"):
        adn.recalibrate_norms(net, [], num_batches=2)


def test_eval_command_recalibrates_and_counts_each_depth_once(tmp_path, fashion_dir, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "resnet20",
                "--width",
                "8",
                "--data",
                "fashion-mnist",
                "--data-path",
                str(fashion_dir),
                "--epochs",
                "1",
                "-b",
                "32",
                "--lr",
                "0.5",
                "--max-steps-per-epoch",
                "6",
                "--output-dir",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    args = ["eval", "--checkpoint", str(out / "checkpoint.pt"), "--no-latency", "--no-plot", "--json"]
    assert main(args + ["--skip", "TTF,TTF,super,FFF"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert [r["skip"] for r in plain] == ["TTF", "FFF"] and all(r["acc5"] <= 100 for r in plain)
    assert main(args + ["--skip", "TTF,FFF", "--recalibrate-bn", "4"]) == 0
    recalibrated = json.loads(capsys.readouterr().out)
    assert [r["recalibrated_bn_batches"] for r in recalibrated] == [4, 4]
    assert main(args + ["--skip", "TTF,FFF", "--recalibrate-bn", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == recalibrated  # deterministic

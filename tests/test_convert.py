import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

import adn
from adn.core.layers import SkipAwareNorm, SkippableBlock
from adn.models import build_model, resnet20


def _convert_with_reference(builder, x, **kwargs):
    torch.manual_seed(0)
    model = builder(**kwargs).eval()
    # Non-trivial running statistics, so a twin that was not an exact copy would show.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    original_state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        reference = model(x)
    return adn.convert(model).eval(), reference, original_state


@pytest.mark.parametrize("builder", [torchvision.models.resnet18, torchvision.models.resnet50])
def test_conversion_keeps_the_super_net_function_and_state_dict(builder):
    x = torch.randn(2, 3, 64, 64)
    net, reference, original_state = _convert_with_reference(builder, x, num_classes=10)
    with torch.no_grad():
        assert torch.allclose(net(x), reference, atol=1e-5)
        assert torch.allclose(net(x, skip="FFFF"), reference, atol=1e-5)
    # The original's state_dict loads unchanged: only the twins are extra.
    result = net.load_state_dict(original_state, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".twin." in k for k in result.missing_keys)
    with torch.no_grad():
        assert torch.allclose(net(x), reference, atol=1e-5)


def test_convert_is_in_place_and_keeps_the_original_class():
    model = torchvision.models.resnet18()
    net = adn.convert(model)
    assert net is model and isinstance(net, torchvision.models.ResNet) and isinstance(net, adn.AdaptiveDepthNetwork)
    with pytest.raises(ValueError, match="already"):
        adn.convert(net)


@pytest.mark.parametrize(
    "name, blocks",
    [
        ("resnet18", [2, 2, 2, 2]),
        ("resnet34", [3, 4, 6, 3]),
        ("resnet50", [3, 4, 6, 3]),
        ("resnet101", [3, 4, 23, 3]),
        ("resnet152", [3, 8, 36, 3]),
        ("wide_resnet50_2", [3, 4, 6, 3]),
        ("resnext50_32x4d", [3, 4, 6, 3]),
    ],
)
def test_split_rule_for_the_torchvision_family(name, blocks):
    with torch.device("meta"):  # structure only: no time spent initialising weights
        net = adn.convert(torchvision.models.get_model(name))
    assert net.num_stages == 4
    for stage, n in zip(net.adn_stages, blocks):
        shared = min(n - 1, -(-n // 2))
        assert (len(stage.shared), len(stage.skippable)) == (shared, n - shared)


def test_resnet50_skippable_blocks_are_1_2_3_1():
    net = adn.convert(torchvision.models.resnet50())
    assert [len(s.skippable) for s in net.adn_stages] == [1, 2, 3, 1]
    assert [adn.split_point(n) for n in (1, 2, 3, 4, 6, 23)] == [0, 1, 2, 2, 3, 12]


def test_unsupported_models_name_the_supported_families():
    with pytest.raises(TypeError) as info:
        adn.convert(torchvision.models.vgg11())
    assert "VGG" in str(info.value) and "resnet" in str(info.value) and "stages=" in str(info.value)


def test_skipped_blocks_are_never_called():
    net = adn.convert(torchvision.models.resnet50(num_classes=10)).eval()
    calls = {}
    for stage in net.adn_stages:
        for block in stage.shared + stage.skippable:
            block.conv1.register_forward_hook(
                lambda m, i, o, b=block: calls.__setitem__(id(b), calls.get(id(b), 0) + 1)
            )
    x = torch.randn(1, 3, 64, 64)
    for config in adn.SkipConfig.all(4):
        calls.clear()
        with torch.no_grad():
            net(x, skip=config)
        for stage, skipped in zip(net.adn_stages, config):
            assert all(calls.get(id(b)) == 1 for b in stage.shared)
            assert all(calls.get(id(b)) == (None if skipped else 1) for b in stage.skippable)


def test_twins_are_used_exactly_when_their_stage_skips():
    net = adn.convert(torchvision.models.resnet18(num_classes=10)).eval()
    used = []
    for name, module in net.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(lambda m, i, o, n=name: used.append(n))
    x = torch.randn(1, 3, 64, 64)
    for config in adn.SkipConfig.all(4):
        used.clear()
        with torch.no_grad():
            net(x, skip=config)
        for stage, skipped in zip(net.adn_stages, config):
            for norm in stage.norms:
                name = next(n for n, m in net.named_modules() if m is norm)
                # The wrapper's hook fires either way; the twin's only when the stage skips.
                assert (f"{name}.twin" in used) == skipped
        twins_used = {n for n in used if n.endswith(".twin")}
        expected = {
            next(n for n, m in net.named_modules() if m is norm) + ".twin"
            for stage, skipped in zip(net.adn_stages, config)
            if skipped
            for norm in stage.norms
        }
        assert twins_used == expected


def test_twins_cover_the_shared_residual_branches_but_not_the_shortcut():
    net = adn.convert(torchvision.models.resnet50())
    for stage in net.adn_stages:
        for block in stage.shared:
            assert all(isinstance(getattr(block, f"bn{i}"), SkipAwareNorm) for i in (1, 2, 3))
            if block.downsample is not None:
                assert not isinstance(block.downsample[1], SkipAwareNorm)
        for block in stage.skippable:
            assert isinstance(block, SkippableBlock)
            assert not any(isinstance(m, SkipAwareNorm) for m in block.modules())
    n_twin_params = sum(p.numel() for n, p in net.named_parameters() if ".twin." in n)
    twinned = sum(
        p.numel()
        for s in net.adn_stages
        for norm in s.norms
        for n, p in norm.named_parameters()
        if not n.startswith("twin.")
    )
    assert n_twin_params == twinned


def test_no_skip_aware_norm_ablation_has_no_twins():
    net = adn.convert(torchvision.models.resnet18(), skip_aware_norm=False)
    assert not any(isinstance(m, SkipAwareNorm) for m in net.modules())
    assert net.num_stages == 4


def test_depth_switch_copies_no_weights():
    net = adn.convert(torchvision.models.resnet18())
    pointers = {n: p.data_ptr() for n, p in net.named_parameters()}
    net.skip = "TTTT"
    net.skip = "TFTF"
    assert {n: p.data_ptr() for n, p in net.named_parameters()} == pointers
    assert str(net.skip) == "TFTF"


def test_skipping_context_restores_depth_even_on_error():
    net = adn.convert(torchvision.models.resnet18())
    net.skip = "TFFF"
    with pytest.raises(RuntimeError):
        with net.skipping("base"):
            assert str(net.skip) == "TTTT"
            raise RuntimeError("boom")
    assert str(net.skip) == "TFFF"


def test_small_resnets_convert_through_the_same_path_with_any_channels():
    for channels in (1, 3):
        x = torch.randn(2, channels, 28, 28)
        net, reference, _ = _convert_with_reference(resnet20, x, num_classes=10, in_channels=channels, width=8)
        assert net.num_stages == 3 and net.adn_info["family"] == "resnet"
        with torch.no_grad():
            assert torch.allclose(net(x), reference, atol=1e-5)
            assert net(x, skip="TTT").shape == (2, 10)
    net = adn.convert(build_model("resnet56", num_classes=100))
    assert [(len(s.shared), len(s.skippable)) for s in net.adn_stages] == [(5, 4)] * 3


def test_own_models_convert_by_naming_their_stages():
    from torchvision.models.resnet import BasicBlock

    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.Sequential(*[BasicBlock(8, 8) for _ in range(4)])
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean((2, 3)))

    x = torch.randn(2, 3, 16, 16)
    model = Mine().eval()
    with torch.no_grad():
        reference = model(x)
    net = adn.convert(model, stages=["body"]).eval()
    assert net.num_stages == 1 and len(net.adn_stages[0].skippable) == 2
    with torch.no_grad():
        assert torch.allclose(net(x), reference, atol=1e-6)
        assert not torch.allclose(net(x, skip="T"), reference)
    with pytest.raises(ValueError, match="no sub-module 'bdy'"):
        adn.convert(Mine(), stages=["bdy"])


def test_converted_networks_pickle_and_deepcopy():
    net = adn.convert(resnet20(in_channels=1, width=4)).eval()
    x = torch.randn(1, 1, 28, 28)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        with torch.no_grad():
            assert torch.allclose(clone(x, skip="TFT"), net(x, skip="TFT"))


def test_a_converted_model_saved_whole_loads_in_a_fresh_process(tmp_path):
    """torch.save(net) pickles the generated classes (AdaptiveResNet, SkipAwareBatchNorm2d, and a norm with
    two mixins once per-depth statistics are recorded) by recipe, so a process that converted nothing
    can load it, and it computes the same at every depth."""
    import subprocess
    import sys

    net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4)).eval()
    adn.record_depth_statistics(net, [torch.randn(8, 1, 28, 28)], num_batches=1)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.save({"net": net, "x": x, "y": {c: net(x, skip=c) for c in ("FFF", "TFT")}}, tmp_path / "whole.pt")
    code = (
        "import torch; d = torch.load(r'%s', weights_only=False); net = d['net']; "
        "assert type(net).__name__ == 'AdaptiveSmallResNet', type(net); "
        "assert all(torch.equal(net(d['x'], skip=c), y) for c, y in d['y'].items()); print('ok')"
    ) % (tmp_path / "whole.pt")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]

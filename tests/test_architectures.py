"""MobileNetV2, ViT and Swin go through the same conversion machinery as ResNets."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import SwinTransformer, VisionTransformer

import adn
from adn.core.distill import SubPathDistillationLoss
from adn.core.layers import SkipAwareNorm
from adn.runtime.profile import count_macs
from adn.training.methods import adn_step


def small_vit():
    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=6, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


def small_swin():
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2, 4, 2], num_heads=[1, 2, 2, 4], window_size=[4, 4], num_classes=10
    )


SMALL = {  # builder, input size, expected (shared, skippable) per stage
    "mobilenet_v2": (
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        64,
        [(1, 1), (2, 1), (2, 2), (2, 1), (2, 1)],
    ),
    "vit": (small_vit, 32, [(2, 1), (2, 1)]),
    "swin": (small_swin, 64, [(1, 1), (1, 1), (2, 2), (1, 1)]),
}


def _randomize_norms(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            nn.init.uniform_(m.weight, 0.5, 1.5)


@pytest.fixture(params=list(SMALL))
def arch(request):
    torch.manual_seed(0)
    builder, size, split = SMALL[request.param]
    model = builder().eval()
    _randomize_norms(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    net = adn.convert(model).eval()
    return request.param, builder, net, x, reference, state, split


def test_conversion_keeps_outputs_and_uses_the_split_rule(arch):
    name, _, net, x, reference, state, split = arch
    with torch.no_grad():
        assert torch.allclose(net(x), reference, atol=1e-5)
    assert [(len(s.shared), len(s.skippable)) for s in net.adn_stages] == split
    result = net.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and all(".twin." in k for k in result.missing_keys)


def test_every_subnetwork_runs_equals_its_subnet_and_costs_less(arch):
    name, _, net, x, *_ = arch
    macs = {}
    for config in adn.SkipConfig.all(net.num_stages):
        with torch.no_grad():
            out = net(x, skip=config)
            assert torch.allclose(net.subnet(config)(x), out, atol=1e-5)
        macs[str(config)] = count_macs(net.subnet(config), x[:1])
    for config, value in macs.items():
        for i, flag in enumerate(config):
            if flag == "F":
                assert macs[config[:i] + "T" + config[i + 1 :]] < value


def test_skipped_blocks_are_not_executed(arch):
    name, _, net, x, *_ = arch
    ran = []
    # A block's first sub-module runs only when the block itself is executed.
    handles = [
        next(iter(block.children())).register_forward_hook(lambda m, i, o, b=block: ran.append(b))
        for stage in net.adn_stages
        for block in stage.skippable
    ]
    with torch.no_grad():
        net(x, skip="base")
        assert ran == []
        net(x, skip="super")
    assert len(ran) == sum(len(s.skippable) for s in net.adn_stages)
    for handle in handles:
        handle.remove()


def test_train_step_with_feature_distillation_and_checkpoint_round_trip(arch, tmp_path):
    name, builder, net, x, *_ = arch
    net.train()
    loss = SubPathDistillationLoss(feature_kd="spatial", channel_dim=net.adn_info["channel_dim"])
    result = adn_step(net, x, torch.tensor([1, 2]), loss)
    assert all(torch.isfinite(torch.tensor(v)) for v in result["terms"].values())
    assert result["terms"]["kd_features"] > 0
    twins = [m.twin for s in net.adn_stages for m in s.norms]
    assert twins and all(t.weight.grad is not None for t in twins if getattr(t, "weight", None) is not None)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    again = adn.convert(builder()).eval()
    again.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    net.eval()
    with torch.no_grad():
        for config in adn.SkipConfig.all(net.num_stages)[::3]:
            assert torch.allclose(again(x, skip=config), net(x, skip=config), atol=1e-6)


@pytest.mark.parametrize("name, published_gmacs", [("mobilenet_v2", 0.30), ("vit_b_16", 17.56), ("swin_t", 4.49)])
def test_super_net_macs_match_torchvision_published_figures(name, published_gmacs):
    net = adn.convert(torchvision.models.get_model(name)).eval()
    x = torch.randn(1, 3, 224, 224)
    super_macs = count_macs(net.subnet(adn.SkipConfig.super_net(net.num_stages)), x)
    assert super_macs / 1e9 == pytest.approx(published_gmacs, rel=0.02)
    base_macs = count_macs(net.subnet(adn.SkipConfig.base_net(net.num_stages)), x)
    assert base_macs < super_macs
    original = sum(p.numel() for p in torchvision.models.get_model(name).parameters())
    twins = sum(p.numel() for s in net.adn_stages for m in s.norms for p in m.twin.parameters())
    assert sum(p.numel() for p in net.parameters()) == original + twins


def test_mobilenet_norms_outside_stages_switch_with_the_nearest_stage():
    net = adn.convert(torchvision.models.mobilenet_v2())
    first, last = net.adn_stages[0], net.adn_stages[-1]
    stem_norm = net.features[0][1]
    final_norm = net.features[18][1]
    assert any(m is stem_norm for m in first.norms) and any(m is final_norm for m in last.norms)
    assert isinstance(stem_norm, SkipAwareNorm)
    net.skip = "TFFFF"
    assert stem_norm.adn_skipped and not final_norm.adn_skipped


def test_swin_patch_merging_norm_switches_with_the_stage_it_opens():
    net = adn.convert(small_swin())
    merge_norm = net.features[2].norm  # between stage 1 (features.1) and stage 2 (features.3)
    assert any(m is merge_norm for m in net.adn_stages[1].norms)
    assert not any(m is merge_norm for m in net.adn_stages[0].norms)
    assert not any(isinstance(m, SkipAwareNorm) for m in net.features[7][1].modules())

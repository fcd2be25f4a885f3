import torch
import torchvision
from torch import nn

import adn
from adn.core.layers import SkipAwareNorm, SkippableBlock
from adn.models import resnet20


def _machinery(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (SkipAwareNorm, SkippableBlock, adn.AdaptiveDepthNetwork))]


def test_every_subnet_of_resnet18_is_plain_equal_and_shares_weights():
    net = adn.convert(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 48, 48)
    shared = {t.data_ptr() for t in list(net.parameters()) + list(net.buffers())}
    for config in adn.SkipConfig.all(4):
        sub = net.subnet(config).eval()
        assert type(sub) is torchvision.models.ResNet and not _machinery(sub)
        with torch.no_grad():
            assert torch.allclose(sub(x), net(x, skip=config), atol=1e-5)
        assert all(t.data_ptr() in shared for t in list(sub.parameters()) + list(sub.buffers()))
        kept = [len(getattr(sub, f"layer{i}")) for i in range(1, 5)]
        assert kept == [1 if skipped else 2 for skipped in config]
    assert str(net.skip) == "FFFF", "subnet() must not change the network's depth"


def test_subnet_state_dict_loads_into_a_plain_network_with_those_blocks_removed():
    net = adn.convert(resnet20(in_channels=1, width=4)).eval()
    x = torch.randn(2, 1, 28, 28)
    for config in adn.SkipConfig.all(3):
        sub = net.subnet(config)
        plain = resnet20(in_channels=1, width=4).eval()
        for layer, skipped in zip((plain.layer1, plain.layer2, plain.layer3), config):
            if skipped:
                for name in list(layer._modules)[adn.split_point(3) :]:
                    del layer._modules[name]
        plain.load_state_dict(sub.state_dict())
        with torch.no_grad():
            assert torch.allclose(plain(x), net(x, skip=config), atol=1e-5)


def test_subnet_parameters_count_only_what_runs():
    net = adn.convert(torchvision.models.resnet50())
    full = sum(p.numel() for p in net.parameters())
    twins = sum(p.numel() for n, p in net.named_parameters() if ".twin." in n)
    original = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    assert full == original + twins
    assert net.active_parameters("FFFF") == original
    assert net.active_parameters("TTTT") < net.active_parameters("TFFF") < original


def test_fold_bn_gives_the_same_outputs_with_no_batch_norm_left():
    from adn.core.fold import count_batch_norms

    for builder, x in (
        (lambda: torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 48, 48)),
        (lambda: adn.build_model("mobilenet_v2_small", num_classes=10), torch.randn(2, 3, 28, 28)),
    ):
        net = adn.convert(builder())
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
        net.eval()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        for config in (adn.SkipConfig.super_net(net.num_stages), adn.SkipConfig.base_net(net.num_stages)):
            folded = net.subnet(config, fold_bn=True)
            assert count_batch_norms(folded) == 0
            with torch.no_grad():
                assert torch.allclose(folded(x), net(x, skip=config), atol=1e-4)
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "folding changed the network"

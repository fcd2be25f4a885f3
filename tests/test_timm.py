"""timm's ResNet, ViT/DeiT, ConvNeXt and MobileNetV2/EfficientNet families through the same machinery."""

import pytest
import torch

import adn
from adn.core.distill import SubPathDistillationLoss
from adn.runtime.profile import count_macs
from adn.vision.train_config import TrainConfig
from adn.training.methods import adn_step
from adn.vision.train import train

timm = pytest.importorskip("timm")

SMALL = {  # timm name, create_model kwargs, input size, family, stages
    "resnet18": ({}, 64, "timm-resnet", 4),
    "deit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8}, 32, "timm-vit", 4),
    "convnext_atto": ({"ls_init_value": 1.0}, 64, "timm-convnext", 4),  # layer scale 1e-6 would make blocks ~identity
    "mobilenetv2_050": ({}, 64, "timm-efficientnet", 5),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_timm_families_convert_keep_outputs_and_train(name):
    kwargs, size, family, stages = SMALL[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    for module in model.modules():  # timm zero-initialises each block's last norm: undo, so blocks do something
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and module.weight is not None:
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = model(x)
    net = adn.convert(model).eval()
    assert net.adn_info["family"] == family and net.num_stages == stages
    with torch.no_grad():
        assert torch.allclose(net(x), reference, atol=1e-5)
    macs = {}
    for config in adn.SkipConfig.all(stages):
        sub = net.subnet(config)
        macs[str(config)] = count_macs(sub, x[:1])
        with torch.no_grad():
            assert torch.allclose(sub(x), net(x, skip=config), atol=1e-5)
    for config, value in macs.items():  # each additional skipped stage removes work
        for i, flag in enumerate(config):
            if flag == "F":
                assert macs[config[:i] + "T" + config[i + 1 :]] < value
    ran = []
    handles = [
        next(iter(b.children())).register_forward_hook(lambda m, i, o, b=b: ran.append(b))
        for s in net.adn_stages
        for b in s.skippable
    ]
    with torch.no_grad():
        net(x, skip="base")
    assert ran == [], "a skipped block was executed"
    for handle in handles:
        handle.remove()
    net.train()
    result = adn_step(net, x, torch.tensor([0, 1]), SubPathDistillationLoss(channel_dim=net.adn_info["channel_dim"]))
    assert result["terms"]["kd_features"] > 0


def test_timm_models_by_name_in_adn_train(tmp_path):
    record = train(
        TrainConfig(
            model="timm/resnet18",
            data="fake",
            epochs=1,
            batch_size=8,
            max_steps_per_epoch=2,
            output_dir=str(tmp_path / "run"),
            progress=False,
        )
    )
    assert record["steps"] == 2
    from adn.vision.checkpoint import load_network

    net, ckpt = load_network(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["meta"]["model"] == "timm/resnet18" and net.num_stages >= 1


def test_published_macs_of_timm_super_nets():
    for name, published in (("resnet50", 4.09), ("vit_base_patch16_224", 17.56), ("convnext_tiny", 4.46)):
        net = adn.convert(timm.create_model(name)).eval()
        macs = count_macs(net.subnet(adn.SkipConfig.super_net(net.num_stages)), torch.randn(1, 3, 224, 224))
        assert macs / 1e9 == pytest.approx(published, rel=0.02), name

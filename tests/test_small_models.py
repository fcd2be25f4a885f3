"""The small MobileNetV2 and ViT for 28/32-pixel images: selectable by name, trainable by every method."""

import pytest
import torch

import adn
from adn.vision.checkpoint import load_network
from adn.vision.train_config import TrainConfig
from adn.vision.train import train


@pytest.mark.parametrize(
    "name, stages, channels, size",
    [("mobilenet_v2_small", 5, 1, 28), ("vit_small_images", 2, 1, 28), ("vit_small_images", 2, 3, 32)],
)
def test_small_models_convert_with_their_family_adapter(name, stages, channels, size):
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    model = adn.build_model(name, num_classes=10, in_channels=channels, **kwargs).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        reference = model(x)
        net = adn.convert(model).eval()
        assert net.num_stages == stages
        assert torch.allclose(net(x), reference, atol=1e-5)
        assert net(x, skip="base").shape == (2, 10)


@pytest.mark.parametrize("name", ["mobilenet_v2_small", "vit_small_images"])
@pytest.mark.parametrize("method", ["adn", "joint", "individual"])
def test_small_models_train_with_every_method(tmp_path, fashion_dir, name, method):
    cfg = TrainConfig(
        model=name,
        data="fashion-mnist",
        data_path=str(fashion_dir),
        output_dir=str(tmp_path / "run"),
        method=method,
        skip="base",
        epochs=1,
        batch_size=16,
        max_steps_per_epoch=3,
        lr=0.01,
        opt="adamw" if name.startswith("vit") else "sgd",
        progress=False,
        # joint training would then measure every depth's statistics (MobileNetV2: 32 depths, over a minute
        # here); tests/test_default_recipe.py covers that step
        depth_statistics=False,
    )
    record = train(cfg)
    assert record["steps"] == 3 and record["train_loss"] == record["train_loss"]  # ran, finite
    net, ckpt = load_network(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["meta"]["model"] == name
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 28, 28), skip="base").shape == (1, 10)


def test_width_is_refused_for_models_without_one():
    with pytest.raises(ValueError, match="--width applies to the small ResNets"):
        adn.build_model("mobilenet_v2_small", num_classes=10, width=8)

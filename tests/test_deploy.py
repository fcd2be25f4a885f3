"""Deployment round trips: every sub-network of ResNet-18 and of the small models exported to ONNX
(run in ONNX Runtime) and to safetensors gives the adaptive network's outputs; compiled depths
switch without compiling; `adn profile --backend` times each engine."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import adn
import adn.runtime.backends
from adn.cli import main
from adn.deploy.export import export_subnetworks

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32)),
    "resnet20": (lambda: adn.build_model("resnet20", num_classes=10, in_channels=1, width=4), (1, 28)),
    "mobilenet_v2_small": (lambda: adn.build_model("mobilenet_v2_small", num_classes=10, in_channels=1), (1, 28)),
    "vit_small_images": (
        lambda: adn.build_model("vit_small_images", num_classes=10, in_channels=1, image_size=28),
        (1, 28),
    ),
}


def _trained_looking(net):
    """Non-trivial statistics and twins that differ from their norms, so a wrong norm would show."""
    torch.manual_seed(0)
    for name, tensor in net.state_dict().items():
        if name.endswith("running_mean") or (".twin." in name and name.endswith("bias")):
            tensor.uniform_(-0.2, 0.2)
        elif name.endswith("running_var"):
            tensor.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_every_subnetwork_round_trips_through_onnx_runtime_and_safetensors(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    build, (channels, size) = MODELS[name]
    net = _trained_looking(adn.convert(build()))
    configs = net.sub_networks()
    if len(configs) > 8:
        # ONNX exports take seconds each (MobileNetV2's 32 about 15 s each, ResNet-18's 16 about 3 s): ONNX
        # for the two trained depths, and one mixed depth of ResNet-18 (safetensors below still covers every
        # depth, and ResNet-20 and the ViT every depth in ONNX too).
        mixed = [configs[len(configs) // 2]] if len(configs) <= 16 else []
        onnx_configs = [configs[0], *mixed, configs[-1]]
    else:
        onnx_configs = configs
    example = torch.randn(1, channels, size, size)
    x = torch.randn(2, channels, size, size)

    # ONNX: export_subnetworks already checks each file in ONNX Runtime at batch 1 and 3; check again
    # here against the adaptive network itself (not the sub-network module) at batch 2.
    entries = export_subnetworks(net, onnx_configs, tmp_path / "onnx", "onnx", example)
    assert [e["skip"] for e in entries] == [str(c) for c in onnx_configs]
    for config in onnx_configs:
        session = ort.InferenceSession(
            str(tmp_path / "onnx" / f"subnet_{config}.onnx"), providers=["CPUExecutionProvider"]
        )
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            assert torch.allclose(got, net(x, skip=config), atol=1e-4), config

    # safetensors: each file restores its sub-network into a network with other weights.
    export_subnetworks(net, configs, tmp_path / "st", "safetensors", example)
    other = adn.convert(build()).eval()
    for config in configs:
        restored = copy.deepcopy(other.subnet(config))
        restored.load_state_dict(load_file(tmp_path / "st" / f"subnet_{config}.safetensors"))
        with torch.no_grad():
            assert torch.allclose(restored(x), net(x, skip=config), atol=1e-5), config
    assert json.loads((tmp_path / "st" / "manifest.json").read_text())["subnetworks"][-1]["skip"] == str(configs[-1])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2_small"])
def test_folded_batch_norm_matches_every_subnetwork(name):
    build, (channels, size) = MODELS[name]
    net = _trained_looking(adn.convert(build()))
    x = torch.randn(2, channels, size, size)
    for config in net.sub_networks():
        with torch.no_grad():
            assert torch.allclose(net.subnet(config, fold_bn=True)(x), net(x, skip=config), atol=1e-4), config


@pytest.fixture
def fast_compile(monkeypatch):
    # dynamo's "eager" backend captures graphs exactly as inductor would be given them, in a fraction
    # of the time; what is tested (which graphs exist, when they are built) does not depend on it.
    monkeypatch.setattr(adn.runtime.backends, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()


def test_compiled_depths_switch_without_compiling(fast_compile):
    from torch._dynamo.utils import counters

    net = _trained_looking(adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4)))
    x = torch.randn(2, 1, 28, 28)
    fast = adn.compile_depths(net, x, ["FFF", "TFT", "TTT"])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 3 and set(fast.compile_seconds) == {"FFF", "TFT", "TTT"}
    for config in ["TTT", "FFF", "TFT", "TTT"]:
        fast.skip = config
        with torch.no_grad():
            assert torch.allclose(fast(x), net(x, skip=config), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs, "a depth switch compiled on the hot path"
    with pytest.raises(ValueError, match="TTF was not compiled"):
        fast.skip = "TTF"


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-per-depth", "compile"])
def test_profile_times_each_backend(backend, fast_compile, capsys):
    if backend.startswith("onnxruntime"):
        pytest.importorskip("onnxruntime")
    assert (
        main(
            [
                "profile",
                "--model",
                "resnet20",
                "--width",
                "4",
                "--in-channels",
                "1",
                "--input-size",
                "28",
                "--num-classes",
                "10",
                "--skip",
                "FFF,TTT",
                "--backend",
                backend,
                "--repeats",
                "3",
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["skip"] for r in rows] == ["FFF", "TTT"]
    assert all(r["backend"] == backend and r["latency_ms"] > 0 for r in rows)
    assert rows[1]["macs"] < rows[0]["macs"]

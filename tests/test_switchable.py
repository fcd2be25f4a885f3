"""One switchable ONNX file for every depth: ``skip`` is an input, a skipped part is an ONNX ``If`` branch not
taken, and every depth gives what the adaptive network gives in PyTorch."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import adn
from adn.runtime.graph_export import export_onnx
from adn.runtime.switchable import (
    SwitchableExportError,
    SwitchableNetwork,
    export_switchable_onnx,
    export_switchable_pt2,
    verify_switchable_onnx,
)

from .test_architectures import _randomize_norms, small_swin, small_vit
from .test_recalibrate import _batches, _trained_net

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _twins_differ(net):
    """Twins that differ from their norms (conversion makes them exact copies), so a wrong norm would show."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in net.modules():
            if isinstance(norm, adn.SkipAwareNorm) and norm.twin.weight is not None:
                norm.twin.weight.add_(torch.rand(norm.twin.weight.shape, generator=generator) * 0.5)
                norm.twin.bias.add_(torch.rand(norm.twin.bias.shape, generator=generator) * 0.4 - 0.2)
    return net.eval()


def _small(name):
    torch.manual_seed(0)
    if name == "resnet20":
        return _twins_differ(adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4))), (1, 28)
    builder, size = {
        "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25), 32),
        "vit": (small_vit, 32),
        "swin": (small_swin, 64),
    }[name]
    model = builder().eval()
    _randomize_norms(model)
    for layer in model.modules():  # torchvision's ViT head starts at zero: every depth would give zeros
        if isinstance(layer, torch.nn.Linear) and not layer.weight.any():
            torch.nn.init.normal_(layer.weight, std=0.5)
    return _twins_differ(adn.convert(model)), (3, size)


def _run_onnx(path, images, config):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy(), "skip": np.array(config, dtype=bool)})[0]


def _check_every_depth(net, path, channels, size):
    """Every depth of the file against the network itself (not only the export's own check), at batch 2, and
    the depths must differ from each other: a file that ignored ``skip`` would fail."""
    images = torch.randn(2, channels, size, size)
    outputs = {}
    for config in net.sub_networks():
        got = _run_onnx(path, images, config)
        with torch.no_grad():
            expected = net(images, skip=config).numpy()
        assert np.isfinite(got).all()
        assert np.abs(got - expected).max() <= 1e-4, config
        outputs[str(config)] = got
    assert len({o.tobytes() for o in outputs.values()}) == len(outputs)


@pytest.fixture(scope="module")
def resnet20_file(tmp_path_factory):
    """The small ResNet and its switchable file (exported once: the export takes seconds)."""
    net, (channels, size) = _small("resnet20")
    path = tmp_path_factory.mktemp("switchable") / "resnet20.onnx"
    report = export_switchable_onnx(net, torch.randn(1, channels, size, size), path)
    return net, path, report


def test_every_depth_of_a_resnet_matches_the_network(resnet20_file):
    net, path, report = resnet20_file
    assert report["depths"] == 8 and report["max_difference"] <= 1e-4 and report["bytes"] == path.stat().st_size
    _check_every_depth(net, path, 1, 28)


@pytest.mark.parametrize("name", ["mobilenet_v2", "vit"])
def test_every_depth_of_the_switchable_file_matches_the_network(name, tmp_path):
    net, (channels, size) = _small(name)
    report = export_switchable_onnx(net, torch.randn(1, channels, size, size), tmp_path / "net.onnx")
    assert report["depths"] == 2**net.num_stages and report["max_difference"] <= 1e-4
    _check_every_depth(net, tmp_path / "net.onnx", channels, size)


def test_per_depth_statistics_are_chosen_by_the_skip_input(tmp_path):
    net = _trained_net()
    adn.record_depth_statistics(net, _batches(), num_batches=3)
    export_switchable_onnx(net, torch.randn(1, 1, 28, 28), tmp_path / "net.onnx")
    _check_every_depth(net, tmp_path / "net.onnx", 1, 28)
    # The rows matter: with the running statistics the file would give other outputs.
    images = torch.randn(4, 1, 28, 28)
    without_rows = _trained_net()  # the same network (same seed), without the rows
    with torch.no_grad():
        running = without_rows(images, skip="TFT").numpy()
    assert np.abs(_run_onnx(tmp_path / "net.onnx", images, adn.SkipConfig("TFT")) - running).max() > 1e-3


def test_skipped_blocks_are_conditionals_and_weights_are_stored_once(resnet20_file, tmp_path):
    onnx = pytest.importorskip("onnx")
    net, path, _ = resnet20_file
    export_onnx(net.subnet("FFF").eval(), torch.randn(1, 1, 28, 28), str(tmp_path / "super.onnx"))
    model = onnx.load(str(path))
    conditionals = [node for node in model.graph.node if node.op_type == "If"]
    assert len(conditionals) == net.num_stages  # one per stage (here: one skippable block each)
    # Plain ONNX: adn's marks of the choices were all replaced by the conditionals.
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert {entry.domain for entry in model.opset_import} <= {"", "ai.onnx"}
    for conditional in conditionals:
        skipped, run = sorted((a.g for a in conditional.attribute), key=lambda graph: len(graph.node))
        assert [node.op_type for node in skipped.node] == ["Identity"]
        assert sum(node.op_type == "Conv" for node in run.node) == 2  # the skipped block, run only when not skipped

    def weight_bytes(graph):
        return sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer)

    # The super-net file holds every weight (its norms folded into the convolutions); the switchable one holds
    # them once, plus the skip-aware norms' twins and selection. (Whole file sizes are not compared: in a model
    # this small the exporter's per-node metadata outweighs the weights; ResNet-50's file is 1.01 super-nets.)
    super_net = onnx.load(str(tmp_path / "super.onnx"))
    twins = sum(
        t.numel() * t.element_size()
        for m in net.modules()
        if isinstance(m, adn.SkipAwareNorm)
        for t in m.twin.state_dict().values()
    )
    assert weight_bytes(model.graph) <= weight_bytes(super_net.graph) * 1.02 + 2 * twins


def test_one_conditional_per_stage_with_its_weights_inside(tmp_path):
    """A stage's skippable blocks run in one ``If``. The weights only a branch reads are stored in that branch
    (ONNX Runtime optimizes a convolution only when its weights are in its own graph), for the branches with
    the fewest weights, up to a fifth of all the weights (the session holds an optimized copy of them); such a
    branch reads its input through an identity pool (so that ONNX Runtime keeps it in its blocked layout)."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    net = _twins_differ(adn.convert(adn.build_model("resnet32", num_classes=10, in_channels=1, width=4)))
    assert [len(stage.skippable) for stage in net.adn_stages] == [2, 2, 2]
    export_switchable_onnx(net, torch.randn(1, 1, 28, 28), tmp_path / "net.onnx")
    _check_every_depth(net, tmp_path / "net.onnx", 1, 28)
    model = onnx.load(str(tmp_path / "net.onnx"))
    conditionals = [node for node in model.graph.node if node.op_type == "If"]
    assert len(conditionals) == net.num_stages

    def size(tensors):
        return sum(onnx.numpy_helper.to_array(t).nbytes for t in tensors)

    outer = {tensor.name for tensor in model.graph.initializer}
    branches = [max((a.g for a in node.attribute), key=lambda graph: len(graph.node)) for node in conditionals]
    local = [branch for branch in branches if branch.initializer]
    assert branches[0] in local  # the first stage's: the fewest weights
    assert size(t for branch in local for t in branch.initializer) <= 0.2 * (
        size(model.graph.initializer) + size(t for branch in local for t in branch.initializer)
    )
    for branch in branches:
        convolutions = [n for n in branch.node if n.op_type == "Conv"]
        assert len(convolutions) == 2 * 2  # two blocks of two convolutions
        inside = {tensor.name for tensor in branch.initializer}
        entry = branch.node[0]
        if branch in local:
            assert all(conv.input[1] in inside and conv.input[1] not in outer for conv in convolutions)
            assert entry.op_type == "MaxPool" and [a.ints for a in entry.attribute if a.name == "kernel_shape"] == [
                [1, 1]
            ]
            assert convolutions[0].input[0] == entry.output[0]
        else:
            assert all(conv.input[1] in outer for conv in convolutions) and entry.op_type != "MaxPool"


STANDALONE = """
import sys
import numpy as np
import onnxruntime

session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
images = np.random.default_rng(0).standard_normal((3, 1, 28, 28), dtype=np.float32)
for flags in ([False, False, False], [True, False, True], [True, True, True]):
    logits = session.run(None, {"images": images, "skip": np.array(flags, dtype=bool)})[0]
    print(logits.shape, bool(np.isfinite(logits).all()))
print("adn" in sys.modules)
"""


def test_the_file_runs_with_numpy_and_onnxruntime_alone(resnet20_file):
    _, path, _ = resnet20_file
    out = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "", "OMP_NUM_THREADS": "1"},
    ).stdout.split("\n")
    assert out[:4] == ["(3, 10) True"] * 3 + ["False"]


def test_a_file_that_differs_from_the_network_is_refused(resnet20_file):
    net, path, _ = resnet20_file
    net = copy.deepcopy(net)  # the fixture's network is shared
    example = torch.randn(1, 1, 28, 28)
    with torch.no_grad():  # the network changes after export: the file no longer computes it
        net.adn_stages[1].skippable[0].conv1.weight.mul_(1.5)
    with pytest.raises(ValueError, match="differs from PyTorch"):
        verify_switchable_onnx(path, net, example)
    with torch.no_grad():
        net.fc.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        verify_switchable_onnx(path, net, example)


def test_the_traced_depth_runs_in_pytorch_too():
    """SwitchableNetwork in eager mode (torch.cond runs the branch taken) gives each depth, and leaves the
    network's default depth and training mode alone."""
    net, (channels, size) = _small("resnet20")
    net.train()
    switchable = SwitchableNetwork(net.eval()).eval()
    images = torch.randn(2, channels, size, size)
    with torch.no_grad():
        for config in ("FFF", "TFT", "TTT"):
            assert torch.allclose(switchable(images, torch.tensor(adn.SkipConfig(config))), net(images, skip=config))
    assert str(net.skip) == "FFF"


@pytest.mark.slow
def test_swin(tmp_path):
    """Swin's attention mask is a tensor constant that torch 2.14's ONNX exporter cannot take inside a
    torch.cond branch; the switchable ONNX file is built from a flat trace (adn.runtime.onnx_choice), so it
    exports like the others."""
    net, (channels, size) = _small("swin")
    export_switchable_onnx(net, torch.randn(1, channels, size, size), tmp_path / "net.onnx")
    _check_every_depth(net, tmp_path / "net.onnx", channels, size)


@pytest.mark.slow
def test_swin_pt2_export_fails_with_a_clear_message_and_writes_nothing(tmp_path):
    """torch 2.14 exports the switchable Swin program but cannot serialize it (the attention mask, a tensor
    constant inside a torch.cond branch): one error that names the step and the cause, and no file."""
    net, (channels, size) = _small("swin")
    with pytest.raises(SwitchableExportError, match=r"torch.export cannot save .*SerializeError"):
        export_switchable_pt2(net, torch.randn(1, channels, size, size), tmp_path / "net.pt2")
    assert list(tmp_path.iterdir()) == []

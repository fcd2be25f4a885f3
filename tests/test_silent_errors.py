"""Errors that used to pass silently (issue 12): threads running one network at different depths got
each other's depth, a NaN ONNX model passed verification, a damaged checkpoint loaded, and an exported
ONNX file needed a data file the manifest did not list."""

from __future__ import annotations

import json
import shutil
import struct
import threading
import zipfile

import pytest
import torch
import torchvision

import adn

DEPTHS = ["FFFF", "TTTT", "TFTF", "FTFT"]


def _run_in_threads(work, args) -> list:
    """Run ``work(arg)`` in one thread per arg, all starting together; returns what the threads raised."""
    start = threading.Barrier(len(args))
    errors = []

    def main(arg):
        try:
            start.wait()
            work(arg)
        except BaseException as error:  # noqa: BLE001  (reported by the test, not lost in the thread)
            errors.append(error)

    threads = [threading.Thread(target=main, args=(arg,)) for arg in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    net = adn.convert(torchvision.models.resnet18(num_classes=10)).eval()
    for module in net.modules():  # twins that differ from their norms: a wrong twin changes the output
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = {depth: net(x, skip=depth) for depth in DEPTHS}
    assert all(not torch.allclose(expected[a], expected[b]) for a in DEPTHS for b in DEPTHS if a < b)
    return net, x, expected


def test_threads_run_one_network_at_different_depths(resnet):
    net, x, expected = resnet
    net.skip = "FFTT"

    def per_call(depth):
        for _ in range(30):
            with torch.no_grad():
                got = net(x, skip=depth)
            assert torch.allclose(got, expected[depth], atol=1e-6), f"a call at {depth} ran at another depth"

    assert _run_in_threads(per_call, DEPTHS) == []
    assert net.skip == adn.SkipConfig("FFTT")  # the default depth is untouched


def test_skipping_blocks_are_per_thread_and_default_depth_is_shared(resnet):
    net, x, expected = resnet
    net.skip = "TFTF"

    def in_block(depth):
        for _ in range(20):
            with net.skipping(depth), torch.no_grad():
                assert net.skip == adn.SkipConfig(depth)
                got = net(x)
            assert torch.allclose(got, expected[depth], atol=1e-6), f"a skipping({depth}) block ran at another depth"

    def at_default(_):
        for _ in range(20):
            with torch.no_grad():
                got = net(x)
            assert torch.allclose(got, expected["TFTF"], atol=1e-6), "a thread at the default depth saw another's block"

    assert _run_in_threads(lambda d: at_default(d) if d is None else in_block(d), [None, "FFFF", "TTTT", "FTFT"]) == []
    # Assigning inside a block changes that block's depth only, until it ends (what adn_step relies on).
    with net.skipping("super"):
        net.skip = "base"
        assert net.skip == adn.SkipConfig("TTTT")
        assert _run_in_threads(lambda _: None if net.skip == adn.SkipConfig("TFTF") else 1 / 0, [0]) == []
    assert net.skip == adn.SkipConfig("TFTF")
    assert net.subnet("TTTT")(x).shape == (2, 10)


# ----- 2 and 4: ONNX files ---------------------------------------------------------------------------------
def _tiny(fill: float | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    if fill is not None:
        torch.nn.init.constant_(model[-1].bias, fill)
    return model


def test_onnx_verification_fails_on_nan_outputs(tmp_path):
    pytest.importorskip("onnxruntime")
    from adn.runtime.graph_export import export_onnx, verify_onnx

    example = torch.randn(1, 1, 8, 8)
    finite, nan = tmp_path / "finite.onnx", tmp_path / "nan.onnx"
    export_onnx(_tiny(), example, str(finite))
    with pytest.raises(ValueError, match=r"PyTorch network gives NaN or infinite outputs.*not writing .*nan\.onnx"):
        export_onnx(_tiny(float("nan")), example, str(nan))  # all outputs NaN: used to verify with difference 0.0
    # An ONNX file whose outputs are NaN where PyTorch's are finite (written without verification).
    torch.onnx.export(
        _tiny(float("nan")),
        (example.expand(2, 1, 8, 8),),
        str(nan),
        dynamo=True,
        external_data=False,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
    )
    finite_in_torch = r"ONNX Runtime gives NaN or infinite outputs for .*nan\.onnx .* where PyTorch's are finite"
    with pytest.raises(ValueError, match=finite_in_torch):
        verify_onnx(nan, _tiny(), example)
    with pytest.raises(ValueError, match="PyTorch network gives NaN or infinite"):
        verify_onnx(finite, _tiny(float("inf")), example)
    assert verify_onnx(finite, _tiny(), example) < 1e-5


def _run_alone(onnx_file, folder, x):
    """Copy ``onnx_file`` to ``folder`` and run it there in ONNX Runtime."""
    import onnxruntime

    folder.mkdir(exist_ok=True)
    copy = shutil.copy(onnx_file, folder)
    session = onnxruntime.InferenceSession(str(copy), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_exported_onnx_files_hold_their_weights(tmp_path):
    pytest.importorskip("onnxruntime")
    from adn.deploy.export import export_subnetworks

    net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4)).eval()
    x = torch.randn(2, 1, 28, 28)
    entries = export_subnetworks(net, ["FFF", "TTT"], tmp_path / "out", "onnx", torch.randn(1, 1, 28, 28))
    # Nothing but the files the manifest lists: no weights beside them under a temporary name.
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["manifest.json", "subnet_FFF.onnx", "subnet_TTT.onnx"]
    assert all("data_file" not in e for e in entries)
    for config in ("FFF", "TTT"):
        got = _run_alone(tmp_path / "out" / f"subnet_{config}.onnx", tmp_path / f"copy_{config}", x)
        with torch.no_grad():
            assert torch.allclose(got, net(x, skip=config), atol=1e-4)


def test_onnx_weights_over_the_one_file_limit_go_to_a_data_file_the_manifest_lists(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import torch.onnx._internal.exporter._onnx_program as onnx_program
    from adn.deploy.export import export_subnetworks

    monkeypatch.setattr(onnx_program, "_LARGE_MODEL_THRESHOLD", 0)  # as if the weights were over 1.5 GB
    net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4)).eval()
    export_subnetworks(net, ["TFT"], tmp_path / "out", "onnx", torch.randn(1, 1, 28, 28))
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["subnetworks"][0]
    assert entry["data_file"] == "subnet_TFT.onnx.data"
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["manifest.json", "subnet_TFT.onnx", "subnet_TFT.onnx.data"]  # no temporary names
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "out" / entry["data_file"], tmp_path / "copy")  # the listed data file goes with it
    x = torch.randn(2, 1, 28, 28)
    got = _run_alone(tmp_path / "out" / entry["file"], tmp_path / "copy", x)
    with torch.no_grad():
        assert torch.allclose(got, net(x, skip="TFT"), atol=1e-4)


# ----- 3: checkpoints --------------------------------------------------------------------------------------
def _flip_byte_inside_largest_tensor(path) -> None:
    with zipfile.ZipFile(path) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        middle = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        handle.seek(middle)
        byte = handle.read(1)[0]
        handle.seek(middle)
        handle.write(bytes([byte ^ 0x10]))


def test_a_checkpoint_with_a_flipped_byte_is_refused_and_earlier_ones_named(tmp_path):
    from adn.errors import CheckpointError
    from adn.utils.checkpoint_file import checkpoint_payload, load_checkpoint
    from adn.training.run_folder import save_rotating

    net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4))
    meta = {"model": "resnet20", "num_classes": 10, "in_channels": 1, "model_kwargs": {"width": 4}}
    for epoch in (1, 2):
        save_rotating(tmp_path, checkpoint_payload(net, meta, epoch=epoch), epoch, 10, keep_last=3)
    latest = tmp_path / "checkpoint.pt"
    _flip_byte_inside_largest_tensor(latest)  # and its hard link, checkpoint-e0002-s0000010.pt
    assert torch.load(latest, weights_only=True)["epoch"] == 2  # torch.load itself notices nothing
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint .*checkpoint.pt is damaged: .*CRC.*earlier checkpoints "
        r"in .*: checkpoint-e0001-s0000010.pt$",
    ):
        load_checkpoint(latest)
    intact = load_checkpoint(tmp_path / "checkpoint-e0001-s0000010.pt")
    assert intact["epoch"] == 1 and all(torch.equal(v, net.state_dict()[k]) for k, v in intact["model"].items())

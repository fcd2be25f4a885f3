"""adn export --switchable (one ONNX file or torch.export program for every depth, its manifest, what is refused),
the standalone ONNX Runtime snippet of docs/evaluation.md, and adn profile / depth-table on one switchable session."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adn
from adn.cli import main
from adn.vision.checkpoint import load_network
from tests.conftest import tiny_train

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, fashion_dir) -> Path:
    """ResNet-20 (width 4, 1x28x28 images) trained for one step, with per-depth statistics (adn recalibrate)."""
    run = tmp_path_factory.mktemp("switchable-run")
    assert main(tiny_train(fashion_dir, run, "--recalibrate-bn", "0")) == 0
    assert main(["recalibrate", "--checkpoint", str(run / "checkpoint.pt"), "--batches", "2", "-b", "32"]) == 0
    # A depth table next to it (the governor's; any latencies do here): adn export --switchable takes it along.
    table = {
        "batch_sizes": [1, 8],
        "depths": [
            {
                "skip": s,
                "acc1": acc,
                "macs": 1,
                "latency_ms": {"1": {"p50": ms, "p99": 2 * ms}, "8": {"p50": 4 * ms, "p99": 8 * ms}},
            }
            for s, acc, ms in (("TTT", 80.0, 0.05), ("TFF", 85.0, 0.1), ("FFF", 90.0, 0.2))
        ],
    }
    (run / "depth_table.json").write_text(json.dumps(table))
    return run / "checkpoint.pt"


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("switchable-export") / "export"
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--switchable", "--output", str(out)]) == 0
    )
    return out


def _run(session, images: np.ndarray, skip: str) -> np.ndarray:
    return session.run(None, {"images": images, "skip": np.array([c == "T" for c in skip])})[0]


def test_one_file_and_a_manifest_that_says_what_it_takes_and_carries(exported, checkpoint):
    assert sorted(p.name for p in exported.iterdir()) == ["manifest.json", "switchable.onnx"]
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["switchable"] is True and manifest["format"] == "onnx" and manifest["file"] == "switchable.onnx"
    assert manifest["inputs"][0] == {"name": "images", "shape": ["batch", 1, 28, 28], "dtype": "float32"}
    assert {k: manifest["inputs"][1][k] for k in ("name", "shape", "dtype")} == {
        "name": "skip",
        "shape": [3],
        "dtype": "bool",
    }
    assert manifest["outputs"] == [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]
    assert isinstance(manifest["opset"], int) and manifest["opset"] >= 18
    assert manifest["per_depth_statistics"] is True and manifest["batch_norm_statistics"].startswith("per depth")
    check = manifest["verification"]
    assert check["verified"] and check["engine"] == "onnxruntime" and check["depths"] == 8
    assert check["tolerance"] == 1e-4 and 0 <= check["max_difference"] <= 1e-4
    assert [e["skip"] for e in manifest["subnetworks"]] == [str(c) for c in adn.SkipConfig.all(3)]
    assert all(
        e["file"] == "switchable.onnx" and e["max_difference"] <= 1e-4 and e["macs"] > 0
        for e in manifest["subnetworks"]
    )
    assert manifest["bytes"] == (exported / "switchable.onnx").stat().st_size
    assert manifest["preprocess"]["channels"] == 1 and len(manifest["class_names"]) == 10
    assert manifest["model"] == "resnet20" and [r["skip"] for r in manifest["depth_table"]["depths"]] == [
        "TTT",
        "TFF",
        "FFF",
    ]

    # The file itself, at every depth, against the checkpoint's network with its per-depth statistics.
    net, _ = load_network(checkpoint)
    net.eval()
    session = ort.InferenceSession(str(exported / "switchable.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 1, 28, 28)
    for config in adn.SkipConfig.all(3):
        with torch.no_grad():
            expected = net(images, skip=config).numpy()
        assert np.abs(_run(session, images.numpy(), str(config)) - expected).max() <= 1e-4


def _snippet() -> str:
    """The standalone snippet of docs/evaluation.md (the python block after its marker)."""
    text = (ROOT / "docs" / "evaluation.md").read_text()
    match = re.search(r"<!-- standalone-onnxruntime -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "docs/evaluation.md lost its standalone ONNX Runtime snippet"
    return match.group(1)


def test_the_documented_snippet_runs_the_file_with_numpy_and_onnxruntime_alone(exported, checkpoint):
    code = _snippet()
    assert "adn" not in re.findall(r"^\s*(?:import|from)\s+(\w+)", code, re.MULTILINE)
    code = code.replace("export/switchable.onnx", str(exported / "switchable.onnx"))
    code += "\nimport sys\nprint('adn loaded:', 'adn' in sys.modules)\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=exported,
        env={"PATH": "", "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "adn loaded: False"
    net, _ = load_network(checkpoint)
    net.eval()
    printed = [line.split(maxsplit=3) for line in lines[:-1]]
    assert [p[0] for p in printed] == ["FFF", "TFT", "TTT"]
    for skip, shape, _, classes in printed:
        with torch.no_grad():
            expected = net(torch.zeros(4, 1, 28, 28), skip=skip).argmax(1).tolist()
        assert shape == "(4," and json.loads(classes) == expected


def test_pt2_switchable_is_one_program_for_every_depth(checkpoint, tmp_path):
    out = tmp_path / "pt2"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--format",
                "pt2",
                "--switchable",
                "--skip",
                "FFF,TFT",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["switchable"] and manifest["file"] == "switchable.pt2" and manifest["verification"]["verified"]
    assert [e["skip"] for e in manifest["subnetworks"]] == ["FFF", "TFT"]
    module = torch.export.load(str(out / "switchable.pt2")).module()
    net, _ = load_network(checkpoint)
    net.eval()
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for skip in ("TTF", "FTT"):  # not among the depths checked at export: the program holds every depth
            got = module(images, torch.tensor([c == "T" for c in skip]))
            assert torch.allclose(got, net(images, skip=skip), atol=1e-4)


def test_bad_input_leaves_nothing_behind_and_reexport_replaces_the_folder(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert (
        main(
            ["export", "--checkpoint", str(checkpoint), "--format", "safetensors", "--switchable", "--output", str(out)]
        )
        == 2
    )
    assert "--switchable writes onnx or pt2" in capsys.readouterr().err and not out.exists()

    # An exporter failure (as torch 2.14's on Swin) is one clear line, and nothing is written.
    from adn.runtime import switchable

    def fails(*args, **kwargs):
        raise RuntimeError("Attempting to use FunctionalTensor on its own")

    monkeypatch.setattr(switchable, "export_switchable_program", fails)
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--format", "pt2", "--switchable", "--output", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("adn: error: torch.export cannot export") and "FunctionalTensor" in err
    assert "--format onnx --switchable" in err and "without --switchable" in err
    assert list(out.iterdir()) == []
    monkeypatch.undo()

    # Broken weights: refused, no file, no temporary file.
    net, ckpt = load_network(checkpoint)
    from adn.utils.checkpoint_file import save_checkpoint

    with torch.no_grad():
        net.fc.weight.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pt", net, ckpt["meta"])
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "nan.pt"),
                "--format",
                "onnx",
                "--switchable",
                "--skip",
                "FFF",
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert "NaN" in capsys.readouterr().err and list(out.iterdir()) == []

    # Per-depth files, then the switchable file into the same folder: the per-depth files go, and back.
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--format",
                "safetensors",
                "--skip",
                "FFF,TTT",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--format",
                "pt2",
                "--switchable",
                "--skip",
                "FFF",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "switchable.pt2"]
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--format",
                "safetensors",
                "--skip",
                "TTT",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "subnet_TTT.safetensors"]


def test_export_help_says_when_each_layout_is_the_better_choice(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--switchable" in text and "batch norms folded" in text and "memory about one network" in text


@pytest.fixture
def sessions(monkeypatch) -> list[str]:
    """The files ONNX Runtime sessions are opened on, from now on."""
    made = []

    class Counted(ort.InferenceSession):
        def __init__(self, path, *args, **kwargs):
            made.append(Path(path).name)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Counted)
    return made


def test_profile_uses_one_switchable_session(checkpoint, sessions, capsys):
    assert (
        main(
            [
                "profile",
                "--checkpoint",
                str(checkpoint),
                "--backend",
                "onnxruntime",
                "--json",
                "--repeats",
                "2",
                "--warmup",
                "1",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8 and all(r["backend"] == "onnxruntime" and r["latency_ms"] > 0 for r in rows)
    # One session for the eight depths (plus the export's own check of the file), none per depth.
    assert len(sessions) == 2 and all("switchable.onnx" in name for name in sessions)


def test_depth_table_uses_one_switchable_session(checkpoint, sessions, tmp_path):
    (tmp_path / "eval.json").write_text(
        json.dumps(
            [{"skip": str(c), "acc1": 50.0 + i, "macs": 1e6 * (8 - i)} for i, c in enumerate(adn.SkipConfig.all(3))]
        )
    )
    assert (
        main(
            [
                "depth-table",
                "--checkpoint",
                str(checkpoint),
                "--eval",
                str(tmp_path / "eval.json"),
                "--backend",
                "onnxruntime",
                "--batch-sizes",
                "1,2",
                "--repeats",
                "2",
                "--warmup",
                "0",
                "--output",
                str(tmp_path / "table.json"),
            ]
        )
        == 0
    )
    assert len(sessions) == 2 and all("switchable.onnx" in name for name in sessions)
    assert json.loads((tmp_path / "table.json").read_text())["conditions"]["backend"] == "onnxruntime"


def test_serve_runs_the_export_folder_without_the_checkpoint(exported, checkpoint, tmp_path, capsys):
    """adn serve --model-dir: the switchable file in one session; preprocessing, class names and depth table from
    the manifest; answers equal to the checkpoint's network at the depth chosen."""
    pytest.importorskip("uvicorn")
    from adn.serve import ServeSettings, Service

    from .test_serve import post, running

    folder = tmp_path / "deployed"  # the folder alone, away from the checkpoint
    folder.mkdir()
    for name in ("switchable.onnx", "manifest.json"):
        (folder / name).write_bytes((exported / name).read_bytes())
    service = Service.from_export(
        folder, ServeSettings(budget_ms=10_000, max_batch=8, max_wait_ms=1, backend="onnxruntime")
    )
    assert service.predictor.net is None and service.engine.layout == "switchable" and len(service.engine.skips) == 8
    net, _ = load_network(checkpoint)
    net.eval()
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (28, 28), dtype=np.uint8)) for i in range(3)]
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    with running(service) as client:
        for skip in (None, "TFT"):
            answer = post(client, blobs, **({"skip": skip} if skip else {})).json()
            assert answer["skip"] == (skip or "FFF")  # the budget lets the governor pick the super-net
            batch = torch.stack([service.predictor.preprocessing.load(blob) for blob in blobs])
            with torch.inference_mode():
                probabilities = torch.softmax(net(batch, skip=answer["skip"]), dim=1)
            for row, prediction in zip(probabilities, answer["predictions"]):
                top = prediction["top"][0]
                assert top["index"] == int(row.argmax()) and top["class"] == service.predictor.class_names[top["index"]]
                assert top["probability"] == pytest.approx(float(row.max()), abs=1e-4)

    assert main(["serve", "--model-dir", str(folder), "--backend", "eager", "--budget-ms", "5", "--port", "0"]) == 2
    assert "--model-dir runs its switchable ONNX file on --backend onnxruntime" in capsys.readouterr().err
    assert main(["serve", "--budget-ms", "5", "--port", "0"]) == 2
    assert "give either --checkpoint FILE" in capsys.readouterr().err
    (folder / "manifest.json").write_text(json.dumps({"switchable": False}))
    assert main(["serve", "--model-dir", str(folder), "--budget-ms", "5", "--port", "0"]) == 2
    assert "does not describe a switchable ONNX file" in capsys.readouterr().err

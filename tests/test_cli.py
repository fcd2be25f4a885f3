"""The command line as users run it: tables, JSON, plots, files, and errors they can act on."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adn.cli import main
from tests.conftest import tiny_train

COMMANDS = ("train", "eval", "profile", "export")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, fashion_dir) -> Path:
    out = tmp_path_factory.mktemp("cli-run")
    assert main(tiny_train(fashion_dir, out, steps=4)) == 0
    return out / "checkpoint.pt"


@pytest.mark.parametrize("command", COMMANDS)
def test_main_commands_have_help_from_the_shell(command):
    result = subprocess.run([sys.executable, "-m", "adn", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: adn " + command in result.stdout


def test_every_command_has_help_text_and_options_explained():
    """`adn --help` gives each command a line, and every option of every command (adn detect's
    subcommands included) says what it does."""
    import argparse

    from adn.cli import build_parser

    def check(parser, name):
        commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        unexplained = [
            a.option_strings[0]
            for a in parser._actions
            if a.option_strings and not a.help and not isinstance(a, argparse._HelpAction)
        ]
        assert not unexplained, f"{name}: options without help: {unexplained}"
        assert parser.format_help().startswith(f"usage: {name}")
        for child_name, child in commands.choices.items() if commands else ():
            listed = [h for h in commands._choices_actions if h.dest == child_name]
            assert listed and listed[0].help, f"{name} {child_name} has no one-line help in `{name} --help`"
            check(child, f"{name} {child_name}")
        return set(commands.choices) if commands else set()

    assert {"serve", "predict", "train-lm", "eval-lm", "generate", "reproduce-finetune"} <= check(build_parser(), "adn")


def test_profile_json_rows(capsys):
    assert (
        main(
            [
                "profile",
                "--model",
                "resnet18",
                "--input-size",
                "64",
                "--num-classes",
                "10",
                "--json",
                "--repeats",
                "2",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 16 and {"skip", "params", "macs", "latency_ms", "batch_size", "threads"} <= set(rows[0])
    assert rows[0]["skip"] == "FFFF" and rows[-1]["macs"] < rows[0]["macs"]


def test_profile_table_is_human_readable(capsys):
    assert (
        main(
            [
                "profile",
                "--model",
                "resnet20",
                "--input-size",
                "32",
                "--num-classes",
                "10",
                "--no-latency",
                "--skip",
                "super,base",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "MACs (M)" in out and "FFF" in out and "TTT" in out


def test_eval_reports_every_subnetwork_and_writes_the_plot(checkpoint, fashion_dir, tmp_path, capsys):
    plot = tmp_path / "plot.png"
    assert (
        main(
            ["eval", "--checkpoint", str(checkpoint), "--json", "--plot", str(plot), "--repeats", "2", "--warmup", "0"]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["skip"] for r in rows] == ["FFF", "TFF", "FTF", "FFT", "TTF", "TFT", "FTT", "TTT"]
    for row in rows:
        assert {"skip", "acc1", "acc5", "params", "macs", "latency_ms"} <= set(row)
        assert 0 <= row["acc1"] <= row["acc5"] <= 100
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", "--checkpoint", str(checkpoint), "--skip", "TTF", "--no-latency", "--no-plot"]) == 0
    assert "TTF" in capsys.readouterr().out


def test_export_writes_one_file_per_subnetwork_and_a_manifest(checkpoint, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "export"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--skip",
                "super,base",
                "--format",
                "safetensors",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["skip"] for e in manifest["subnetworks"]] == ["FFF", "TTT"]
    weights = load_file(out / "subnet_TTT.safetensors")
    assert not any(".twin." in k for k in weights) and "layer1.2.conv1.weight" not in weights
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--skip", "TFT", "--format", "pt2", "--output", str(out)]) == 0
    )
    program = torch.export.load(out / "subnet_TFT.pt2")
    assert program.module()(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("adn: error: ")
    return err


@pytest.mark.parametrize("skip", ["TTFF", "TTX", "deep"])
def test_malformed_skip_configs(checkpoint, capsys, skip, tmp_path):
    err = _error(capsys, ["eval", "--checkpoint", str(checkpoint), "--skip", skip, "--no-plot"])
    assert "3 stages" in err
    err = _error(
        capsys, ["export", "--checkpoint", str(checkpoint), "--skip", f"FFF,{skip}", "--output", str(tmp_path / "x")]
    )
    assert not (tmp_path / "x" / "subnet_FFF.safetensors").exists(), "nothing may be written for a bad request"


def test_unknown_model_suggests_close_names(capsys):
    err = _error(capsys, ["profile", "--model", "resnet5O"])
    assert "did you mean" in err.lower() and "resnet50" in err


def test_missing_dataset_path(capsys, tmp_path):
    err = _error(
        capsys,
        [
            "train",
            "--data",
            "fashion-mnist",
            "--data-path",
            str(tmp_path / "nope"),
            "--output-dir",
            str(tmp_path / "run"),
        ],
    )
    assert "does not exist" in err


def test_missing_and_corrupt_checkpoints(capsys, tmp_path):
    assert "does not exist" in _error(capsys, ["eval", "--checkpoint", str(tmp_path / "none.pt")])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    assert "corrupted" in _error(capsys, ["eval", "--checkpoint", str(corrupt)])


def test_checkpoint_of_another_architecture(checkpoint, capsys, tmp_path):
    import torch

    data = torch.load(checkpoint, weights_only=True)
    data["meta"]["model"] = "resnet32"
    other = tmp_path / "other.pt"
    torch.save(data, other)
    err = _error(capsys, ["eval", "--checkpoint", str(other), "--no-plot"])
    assert "does not fit" in err and "missing keys" in err


def test_unwritable_output_dir_is_refused_before_training(capsys, tmp_path, fashion_dir):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    err = _error(
        capsys,
        ["train", "--data", "fashion-mnist", "--data-path", str(fashion_dir), "--output-dir", str(blocker / "run")],
    )
    assert "cannot write to output directory" in err
    assert blocker.read_text() == "I am a file"


def test_train_and_eval_on_imagenet_layout_folders(tmp_path, capsys):
    from tests.conftest import write_image_folder

    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=4, size=40)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "resnet18",
                "--data",
                "imagefolder",
                "--data-path",
                str(root),
                "--train-crop-size",
                "32",
                "--epochs",
                "1",
                "-b",
                "4",
                "--output-dir",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--json",
                "--no-latency",
                "--no-plot",
                "--skip",
                "super,base",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["skip"] for r in rows] == ["FFFF", "TTTT"] and rows[0]["params"] > rows[1]["params"]


def test_a_model_that_does_not_fit_the_images_is_named(capsys, tmp_path, fashion_dir):
    err = _error(
        capsys,
        [
            "train",
            "--model",
            "vit_b_16",
            "--data",
            "fashion-mnist",
            "--data-path",
            str(fashion_dir),
            "--output-dir",
            str(tmp_path / "run"),
        ],
    )
    assert "vit_b_16 takes 3-channel images" in err
    err = _error(capsys, ["train", "--model", "vit_b_16", "--data", "fake", "--output-dir", str(tmp_path / "run")])
    assert (
        "vit_b_16 cannot process images of shape (3, 32, 32) from fake random images" in err
        and "--train-crop-size" in err
    )
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_onnx_export_runs_in_onnx_runtime_with_a_dynamic_batch(checkpoint, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    import torch

    from adn.vision.checkpoint import load_network

    out = tmp_path / "onnx"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--skip",
                "FFF,TFT,TTT",
                "--format",
                "onnx",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("subnet_") == 3, "stdout lists the files and nothing else"
    net, _ = load_network(checkpoint)
    net.eval()
    for config in ("FFF", "TFT", "TTT"):
        session = ort.InferenceSession(str(out / f"subnet_{config}.onnx"), providers=["CPUExecutionProvider"])
        images = torch.randn(5, 1, 28, 28)
        got = session.run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            expected = net(images, skip=config).numpy()
        assert np.allclose(got, expected, atol=1e-4)


def test_pareto_reads_eval_and_profile_json(checkpoint, tmp_path, capsys):
    assert (
        main(["eval", "--checkpoint", str(checkpoint), "--json", "--no-plot", "--repeats", "2", "--warmup", "0"]) == 0
    )
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(capsys.readouterr().out)
    rows = json.loads(eval_json.read_text())
    profile = [
        {"skip": r["skip"], "params": r["params"], "macs": r["macs"], "latency_ms": 10.0 - i}
        for i, r in enumerate(rows)
    ]  # a made-up device where deeper skipping is always faster
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    plot = tmp_path / "p.png"
    assert (
        main(
            [
                "pareto",
                "--eval",
                str(eval_json),
                "--profile",
                str(tmp_path / "profile.json"),
                "--plot",
                str(plot),
                "--json",
            ]
        )
        == 0
    )
    front = json.loads(capsys.readouterr().out)
    best = max(r["acc1"] for r in rows)
    # The fastest sub-network is always optimal, the most accurate one too; accuracy rises with latency.
    assert front[0]["skip"] == "TTT" and front[-1]["acc1"] == best
    assert [r["acc1"] for r in front] == sorted(r["acc1"] for r in front)
    assert all(a["latency_ms"] < b["latency_ms"] for a, b in zip(front, front[1:]))
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "lack ['acc1']" in _error(capsys, ["pareto", "--eval", str(tmp_path / "profile.json"), "--plot", str(plot)])
    (tmp_path / "bad.json").write_text("{not json")
    assert "adn eval --json" in _error(capsys, ["pareto", "--eval", str(tmp_path / "bad.json")])


def test_adn_load_gives_the_trained_network_ready_to_use(checkpoint):
    import torch

    import adn
    from adn.vision.checkpoint import load_network

    net = adn.load(checkpoint)
    reference, _ = load_network(checkpoint)
    assert isinstance(net, adn.AdaptiveDepthNetwork) and not net.training and str(net.skip) == "FFF"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(x, skip="TFT"), reference.eval()(x, skip="TFT"))
    with pytest.raises(adn.errors.CheckpointError):
        adn.load(checkpoint.parent / "missing.pt")


def test_profile_reads_everything_it_needs_from_a_checkpoint(checkpoint, capsys):
    assert main(["profile", "--checkpoint", str(checkpoint), "--json", "--repeats", "2", "--warmup", "0"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8 and rows[0]["skip"] == "FFF" and rows[-1]["macs"] < rows[0]["macs"]
    assert main(["profile", "--checkpoint", str(checkpoint), "--width", "8", "--no-latency"]) == 2
    assert "the checkpoint fixes the network" in capsys.readouterr().err
    assert main(["profile", "--no-latency"]) == 2
    assert "either --model" in capsys.readouterr().err

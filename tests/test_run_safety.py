"""Issue 12, items 5-7 and 9-14: runs that own their folder, Ctrl-C that keeps the steps done, settings and
checkpoints checked like the untrusted input they are, and a message (``adn: error: ...``, exit status 2)
wherever a traceback used to be. Every failed command leaves the files already on disk as they were."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from adn.utils import jsonout
from adn.utils.checkpoint_file import load_checkpoint, numbered_checkpoints
from adn.vision.checkpoint import load_network
from adn.cli import main
from adn.training.run_folder import LOCK_NAME, RunLock
from adn.vision.train import Trainer


def _train(fashion_dir, out, *extra) -> list[str]:
    return [
        "train",
        "--model",
        "resnet20",
        "--width",
        "4",
        "--data-path",
        str(fashion_dir),
        "--epochs",
        "1",
        "-b",
        "32",
        "--max-steps-per-epoch",
        "2",
        "--val-subset",
        "32",
        "--recalibrate-bn",
        "0",
        "--output-dir",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def _fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("adn: error: ")]
    assert errors, err[-2000:]
    for fragment in fragments:
        assert fragment in errors[-1], errors[-1]
    return errors[-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fashion_dir) -> Path:
    """A finished run's folder, which the failed commands below must leave untouched."""
    out = tmp_path_factory.mktemp("finished")
    assert main(_train(fashion_dir, out)) == 0
    return out


def _altered(tmp_path: Path, source: Path, change) -> Path:
    """A copy of checkpoint ``source`` with ``change(data)`` applied (a fresh file: its CRCs are valid)."""
    data = torch.load(source, weights_only=True)
    change(data)
    path = tmp_path / f"altered-{len(list(tmp_path.glob('altered-*')))}.pt"
    torch.save(data, path)
    return path


# ----- item 7: one run per output folder -------------------------------------------------------------------
def test_a_second_run_in_a_folder_in_use_is_refused(capsys, fashion_dir, tmp_path):
    folder = tmp_path / "run"
    other = RunLock(folder).acquire()  # a live run holds the folder (the OS lock, as in another process)
    try:
        _fails(
            capsys,
            _train(fashion_dir, folder),
            "is in use by another adn train",
            f"pid {os.getpid()}",
            "choose another --output-dir",
        )
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]
    finally:
        other.release()
    assert main(_train(fashion_dir, folder)) == 0  # free again once that run is over
    assert not (folder / LOCK_NAME).exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(capsys, fashion_dir, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("pid 999999 on elsewhere since 2024-01-01 00:00:00\n")  # nobody holds it
    assert main(_train(fashion_dir, folder)) == 0
    err = capsys.readouterr().err
    assert "taking over the lock of a run that is no longer running (pid 999999" in err
    assert (folder / "checkpoint.pt").is_file() and not (folder / LOCK_NAME).exists()


def test_a_fresh_run_refuses_another_runs_folder_unless_told(capsys, fashion_dir, tmp_path):
    folder = tmp_path / "run"
    assert main(_train(fashion_dir, folder, "--save-every-steps", "1", "--keep-last", "3", "--epochs", "2")) == 0
    before = _fingerprint(folder)
    _fails(
        capsys,
        _train(fashion_dir, folder, "--seed", "1"),
        "holds another run's files",
        "checkpoint.pt",
        "numbered checkpoint(s)",
        "log.jsonl",
        f"--resume {folder / 'checkpoint.pt'}",
        "--overwrite",
    )
    assert _fingerprint(folder) == before
    _fails(
        capsys,
        _train(fashion_dir, folder, "--overwrite", "--resume", str(folder / "checkpoint.pt")),
        "--overwrite and --resume exclude each other",
    )
    assert _fingerprint(folder) == before

    assert main(_train(fashion_dir, folder, "--seed", "1", "--overwrite", "--keep-last", "3")) == 0
    assert "deleted the previous run's" in capsys.readouterr().err
    # Only the new run's files: one log line, its own numbered checkpoint (the old, later-sorting ones are gone).
    assert [r["epoch"] for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines())] == [1]
    assert [p.name for p in numbered_checkpoints(folder)] == ["checkpoint-e0001-s0000002.pt"]
    assert load_checkpoint(folder / "checkpoint.pt")["meta"]["config"]["seed"] == 1


def test_a_failed_start_leaves_no_folder_behind(capsys, fashion_dir, tmp_path):
    """docs/training.md: bad settings fail before anything is written (item 13: data and resume failures)."""
    _fails(capsys, _train(tmp_path / "no-data", tmp_path / "a"), "does not exist")
    _fails(capsys, _train(fashion_dir, tmp_path / "b", "--resume", str(tmp_path / "nope.pt")), "does not exist")
    _fails(capsys, _train(fashion_dir, tmp_path / "c", "--model", "resnet5O"), "unknown model")
    assert not any((tmp_path / name).exists() for name in "abc")


# ----- item 9: SIGINT/SIGTERM keep the steps done ----------------------------------------------------------------
def _signal_after(monkeypatch, steps: int, signum: int) -> None:
    """Deliver ``signum`` to this process after ``steps`` training steps, as Ctrl-C or kill would."""
    original, done = Trainer.train_step, []

    def train_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        done.append(1)
        if len(done) == steps:
            signal.raise_signal(signum)
        return result

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_saves_the_steps_done_and_says_how_to_resume(
    capsys, monkeypatch, fashion_dir, tmp_path, signum, status
):
    folder = tmp_path / "run"
    argv = _train(fashion_dir, folder, "--max-steps-per-epoch", "6")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    _signal_after(monkeypatch, 3, signum)
    assert main(argv) == status
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert (
        f"adn: interrupted: {name} at epoch 1, step 3 of 6: the steps done are saved in {folder / 'checkpoint.pt'}"
        in err
    )
    assert f"--resume {folder / 'checkpoint.pt'}" in err
    saved = load_checkpoint(folder / "checkpoint.pt")
    assert saved["step_in_epoch"] == 3 and saved["progress"]["steps"] == 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    monkeypatch.undo()
    assert main([*argv, "--resume", str(folder / "checkpoint.pt")]) == 0
    assert json.loads((folder / "log.jsonl").read_text())["steps"] == 6


# ----- item 5: numbers out of range ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr-gamma", "-1"], "--lr-gamma must be in (0, 1], got -1.0"),
        (["--label-smoothing", "-1"], "--label-smoothing must be in [0, 1), got -1.0"),
        (["--label-smoothing", "5"], "--label-smoothing must be in [0, 1), got 5.0"),
        (["--lr-step-size", "0"], "--lr-step-size must be in [1, inf), got 0"),
        (["--momentum", "1.5"], "--momentum must be in [0, 1), got 1.5"),
        (["--wd=-1e-4"], "--wd must be >= 0"),
        (["--lr-min", "1"], "--lr-min (1.0) must not exceed --lr (0.1)"),
        (["--temperature", "inf"], "--temperature must be a finite number"),
    ],
)
def test_numeric_settings_out_of_range(capsys, fashion_dir, finished, extra, fragment):
    before = _fingerprint(finished)
    _fails(capsys, _train(fashion_dir, finished, *extra), fragment)
    assert _fingerprint(finished) == before


def test_non_finite_weights_are_never_saved_nor_evaluated(capsys, monkeypatch, fashion_dir, finished, tmp_path):
    nan = _altered(tmp_path, finished / "checkpoint.pt", lambda d: d["model"]["conv1.weight"].fill_(math.nan))
    _fails(
        capsys,
        ["eval", "--checkpoint", str(nan), "--no-plot", "--no-latency"],
        "NaN or infinite weights",
        "conv1.weight",
        "earlier checkpoint",
    )
    original = Trainer.train_step

    def poisoned(self, *args, **kwargs):  # a step whose loss was finite but left a weight infinite
        result = original(self, *args, **kwargs)
        with torch.no_grad():
            next(self.net.parameters()).fill_(math.inf)
        return result

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    _fails(
        capsys,
        _train(fashion_dir, tmp_path / "run", "--max-steps-per-epoch", "1"),
        "weight tensors became NaN or infinite",
        "they were not saved",
        "No checkpoint was written yet",
    )
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_json_output_never_holds_nan():
    text = jsonout.dumps({"acc": math.nan, "rows": [1.5, math.inf, {"x": -math.inf}]})
    assert json.loads(text) == {"acc": None, "rows": [1.5, None, {"x": None}]}
    assert "NaN" not in text and "Infinity" not in text


# ----- item 10: the results come before the plot --------------------------------------------------------------
def test_eval_prints_its_results_when_the_plot_cannot_be_written(capsys, finished, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(finished / "checkpoint.pt"),
                "--plot",
                str(blocker / "plot.png"),
                "--no-latency",
                "--skip",
                "super,base",
                "--json",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert [row["skip"] for row in json.loads(out)] == ["FFF", "TTT"]
    assert f"adn: warning: could not write the plot {blocker / 'plot.png'}" in err and "--no-plot" in err
    assert blocker.read_text() == "keep me"


# ----- item 14: --help and mistyped flags ----------------------------------------------------------------------
def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # one line: argparse wraps at the terminal width


def test_help_shows_every_default_once_and_reads_right_for_off_flags(capsys):
    text = _help(capsys, "train")
    for fragment in (
        "(default: 10)",
        "(default: 128)",
        "initial learning rate (default: 0.1)",
        "(default: sgd)",
        "weight decay (default: 0.0001)",
        "(default: fashion-mnist)",
        "--no-progress no progress bars (default: off)",
        "(default: off)",
    ):
        assert fragment in text, fragment
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    assert text.count("(default 16)") == 1 and "(default 16) (default" not in text
    eval_text = _help(capsys, "eval")
    assert "--no-latency skip latency measurement (default: off)" in eval_text and "(default: None)" not in eval_text


def test_a_mistyped_flag_shows_the_commands_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epcohs", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "usage: adn train" in err and "unrecognized arguments: --epcohs 3" in err
    assert "--epcohs: did you mean --epochs?" in err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", "x", "--no-plto"])
    assert "usage: adn eval" in (err := capsys.readouterr().err) and "did you mean --no-plot" in err


# ----- item 12: messages, not tracebacks ---------------------------------------------------------------------
def test_damaged_checkpoints_and_state_give_messages(capsys, fashion_dir, finished, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.touch()
    _fails(capsys, ["eval", "--checkpoint", str(empty), "--no-plot"], f"checkpoint {empty} is empty (0 bytes)")
    odd_meta = _altered(tmp_path, finished / "checkpoint.pt", lambda d: d["meta"].update(num_classes="ten"))
    _fails(
        capsys,
        ["eval", "--checkpoint", str(odd_meta), "--no-plot"],
        "invalid metadata: num_classes = 'ten'",
        "expected an integer",
    )
    no_meta = _altered(tmp_path, finished / "checkpoint.pt", lambda d: d.update(meta=[1, 2]))
    _fails(capsys, ["export", "--checkpoint", str(no_meta), "--output", str(tmp_path / "x")], "invalid metadata")
    before = _fingerprint(finished)
    odd_state = _altered(tmp_path, finished / "checkpoint.pt", lambda d: d.update(epoch="one"))
    _fails(
        capsys,
        _train(fashion_dir, finished, "--resume", str(odd_state), "--epochs", "2"),
        "epoch = one, expected an epoch number",
    )
    odd_optimizer = _altered(tmp_path, finished / "checkpoint.pt", lambda d: d["optimizer"].update(state=5))
    _fails(
        capsys,
        _train(fashion_dir, finished, "--resume", str(odd_optimizer), "--epochs", "2"),
        "its training state is malformed",
    )
    assert _fingerprint(finished) == before


def test_models_weights_and_sizes_that_do_not_fit_give_messages(capsys, tmp_path):
    run = ["train", "--data", "fake", "--train-crop-size", "32", "--output-dir", str(tmp_path / "run"), "--no-progress"]
    _fails(
        capsys,
        [*run, "--model", "resnet18", "--weights", "NOPE"],
        "--weights NOPE: resnet18 has no such weights",
        "IMAGENET1K_V1",
    )
    _fails(
        capsys,
        ["profile", "--model", "vit_b_16", "--input-size", "64", "--no-latency"],
        "vit_b_16 cannot process 3x64x64 images",
        "--input-size",
    )
    pytest.importorskip("timm")
    _fails(
        capsys,
        [*run, "--model", "timm/densenet121"],
        "--model timm/densenet121: adn.convert does not support",
        "Supported families",
    )
    assert not (tmp_path / "run").exists()


def test_running_out_of_memory_is_a_message(capsys, monkeypatch):
    def exhausted(args):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 120000000000 bytes"
        )

    monkeypatch.setattr("adn.cli.profile.run", exhausted)
    _fails(capsys, ["profile", "--model", "resnet20"], "out of memory", "can't allocate memory", "smaller batch size")


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(capsys, monkeypatch, fashion_dir, finished):
    before = _fingerprint(finished)

    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
            "data/0: file write failed; unexpected pos 4544 vs 4437"
        )

    monkeypatch.setattr(torch, "save", full_disk)
    _fails(
        capsys,
        _train(fashion_dir, finished, "--resume", str(finished / "checkpoint.pt"), "--epochs", "2"),
        "could not write checkpoint",
        "unexpected pos",
        "the previous checkpoint.pt is intact",
        "disk full",
    )
    assert _fingerprint(finished) == before


# ----- item 11: the checkpoint does not steer the program -----------------------------------------------------
@pytest.mark.parametrize(
    "change, fragment",
    [
        (
            lambda d: d["meta"]["model_kwargs"].update(checkpoint_path="/etc/passwd"),
            "model_kwargs = {'width': 4, 'checkpoint",
        ),
        (lambda d: d["meta"]["model_kwargs"].update(weights="DEFAULT"), "with keys among ['image_size', 'width']"),
        (lambda d: d["meta"]["model_kwargs"].update(width=10**9), "model_kwargs.width = 1000000000"),
        (lambda d: d["meta"].update(model="os.system"), "model = 'os.system', expected the name of a model"),
        (lambda d: d["meta"].update(num_classes=10**12), "num_classes"),
        (lambda d: d["meta"].update(dataset="../../etc"), "dataset = '../../etc'"),
    ],
)
def test_checkpoint_metadata_is_checked_like_input(capsys, finished, tmp_path, change, fragment):
    bad = _altered(tmp_path, finished / "checkpoint.pt", change)
    _fails(capsys, ["eval", "--checkpoint", str(bad), "--no-plot", "--no-latency"], fragment, "invalid metadata")


def test_metadata_that_lies_about_the_size_is_refused_before_allocating(capsys, finished, tmp_path):
    bad = _altered(tmp_path, finished / "checkpoint.pt", lambda d: d["meta"]["model_kwargs"].update(width=1024))
    _fails(capsys, ["eval", "--checkpoint", str(bad), "--no-plot", "--no-latency"], "does not fit", "conv1.weight")


def test_a_checkpoint_never_makes_adn_download_or_create_folders(capsys, finished, tmp_path):
    target = tmp_path / "chosen-by-the-file"
    bad = _altered(
        tmp_path, finished / "checkpoint.pt", lambda d: d["meta"].update(dataset="cifar10", data_path=str(target))
    )
    _fails(
        capsys,
        ["eval", "--checkpoint", str(bad), "--no-plot", "--no-latency"],
        "never start a download",
        "--data cifar10",
    )
    assert not target.exists()


def test_resuming_from_an_absurd_epoch_fails_at_once(capsys, fashion_dir, finished, tmp_path):
    bad = _altered(tmp_path, finished / "checkpoint.pt", lambda d: d.update(epoch=10**12))
    _fails(
        capsys,
        _train(fashion_dir, tmp_path / "run", "--resume", str(bad)),
        "epoch = 1000000000000",
        "expected an epoch number in [0, 1000000]",
    )


# ----- item 13: smaller ones ---------------------------------------------------------------------------------------
def test_a_folder_given_as_checkpoint_is_named_as_a_folder(capsys, finished):
    _fails(
        capsys,
        ["eval", "--checkpoint", str(finished), "--no-plot"],
        "is a folder, not a file",
        str(finished / "checkpoint.pt"),
    )


def test_a_relative_data_path_is_stored_absolute(fashion_dir, finished, monkeypatch, tmp_path):
    monkeypatch.chdir(fashion_dir.parent)
    assert main(_train(Path(fashion_dir.name), tmp_path / "run")) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["meta"]["data_path"] == os.path.abspath(fashion_dir)


def _export(finished, out, skip: str, fmt: str) -> list[str]:
    return [
        "export",
        "--checkpoint",
        str(finished / "checkpoint.pt"),
        "--skip",
        skip,
        "--format",
        fmt,
        "--output",
        str(out),
    ]


def test_re_exporting_a_subset_removes_the_earlier_exports_files(capsys, finished, tmp_path):
    out = tmp_path / "export"
    assert main(_export(finished, out, "FFF,TTT,TFT", "safetensors")) == 0
    (out / "notes.txt").write_text("mine")  # not adn's: must survive
    assert main(_export(finished, out, "TTT", "safetensors")) == 0
    err = capsys.readouterr().err
    assert f"removed {out / 'subnet_FFF.safetensors'}" in err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "subnet_TTT.safetensors"]
    # Another format replaces the earlier files the same way.
    assert main(_export(finished, out, "TTT", "pt2")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "subnet_TTT.pt2"]


def test_a_manifest_edited_by_hand_never_makes_export_delete_other_files(finished, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (tmp_path / "precious.pt").write_text("keep")
    (out / "notes.txt").write_text("keep")
    listed = [
        {"skip": "FFF", "file": "../precious.pt"},
        {"skip": "TTT", "file": "notes.txt", "data_file": "/etc/hosts"},
        {"skip": "TFT", "file": ["subnet_TFT.pt2"]},
        "subnet_FTF.pt2",
    ]
    (out / "manifest.json").write_text(json.dumps({"subnetworks": listed}))
    assert main(_export(finished, out, "TTT", "safetensors")) == 0
    assert (tmp_path / "precious.pt").exists() and (out / "notes.txt").exists()
    (out / "manifest.json").write_text("{not json")  # a damaged manifest: not recognisably adn's, so refused...
    assert main(_export(finished, out, "FFF", "safetensors")) == 2
    assert main([*_export(finished, out, "FFF", "safetensors"), "--overwrite"]) == 0  # ...unless told; nothing removed
    assert (out / "subnet_TTT.safetensors").exists()


def test_exported_pt2_programs_run_at_any_batch_size(finished, tmp_path):
    out = tmp_path / "export"
    assert main(_export(finished, out, "TFT", "pt2")) == 0
    entry = json.loads((out / "manifest.json").read_text())["subnetworks"][0]
    assert entry["dynamic_batch"] is True and "batch_size" not in entry
    program = torch.export.load(out / entry["file"]).module()
    net, _ = load_network(finished / "checkpoint.pt")
    for batch in (1, 3, 8):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert torch.allclose(program(x), net.eval()(x, skip="TFT"), atol=1e-5), batch

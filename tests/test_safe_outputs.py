"""Every command that writes follows one rule (adn.utils.outputs): an existing path is replaced only when it
holds the command's own earlier output or with --overwrite, never the command's input, never anything but a
regular file; writes are atomic, and the temporaries a killed write left are removed by the next one. Write
failures name their real cause and a flag that exists."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import adn
from adn.cli import main
from adn.utils.atomic import atomic_write, remove_stale_temporaries
from adn.utils.checkpoint_file import load_checkpoint, save_checkpoint, write_failure
from adn.utils.outputs import CHECKPOINT, OutputError, output_path

META = {
    "model": "resnet20",
    "model_kwargs": {"width": 4},
    "num_classes": 10,
    "in_channels": 3,
    "image_size": 32,
    "skip_aware_norm": True,
    "method": "adn",
    "dataset": "fake",
    "config": {"seed": 0},
}


def tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=3, width=4))
    save_checkpoint(path, net, META)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("outputs") / "checkpoint.pt")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("adn: error: ")]
    assert lines, err[-2000:]
    return lines[-1]


def _recalibrate(checkpoint, *extra) -> list[str]:
    return ["recalibrate", "--checkpoint", str(checkpoint), "--batches", "1", "-b", "4", *extra]


# ----- the rule, once ----------------------------------------------------------------------------------------------
def test_the_rule_refuses_what_is_not_the_commands_own_output(tmp_path, checkpoint):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(OutputError, match="exists and is not an adn checkpoint.*--overwrite"):
        output_path(notes, CHECKPOINT)
    assert output_path(notes, CHECKPOINT, overwrite=True) == notes.resolve()  # told to: allowed
    assert output_path(checkpoint, CHECKPOINT) == checkpoint.resolve()  # its own earlier output: allowed
    assert output_path(tmp_path / "new" / "model.pt", CHECKPOINT) == (tmp_path / "new" / "model.pt").resolve()
    with pytest.raises(OutputError, match="is a folder; give the path of a file.*model.pt"):
        output_path(tmp_path, CHECKPOINT, overwrite=True)
    with pytest.raises(OutputError, match="--output is empty"):
        output_path("", CHECKPOINT)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="is a named pipe, not a regular file"):
        output_path(fifo, CHECKPOINT, overwrite=True)
    with pytest.raises(OutputError, match="is a device, not a regular file"):
        output_path("/dev/null", CHECKPOINT, overwrite=True)  # (only checked: nothing is written)
    # The input is never replaced, --overwrite or not, under another name or through a hard or symbolic link.
    linked = tmp_path / "hard.pt"
    os.link(checkpoint, linked)
    symbolic = tmp_path / "soft.pt"
    symbolic.symlink_to(checkpoint)
    for name in (checkpoint, linked, symbolic):
        with pytest.raises(OutputError, match="is this command's input"):
            output_path(name, CHECKPOINT, overwrite=True, inputs=[("--checkpoint", checkpoint)])
    # A file in the way of the folder.
    with pytest.raises(OutputError, match="is a file, not a folder"):
        output_path(notes / "model.pt", CHECKPOINT)


def test_a_symbolic_link_is_written_through_and_stays_a_link(tmp_path, checkpoint, capsys):
    target = tmp_path / "real.pt"
    target.write_bytes(checkpoint.read_bytes())
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    assert main(_recalibrate(checkpoint, "--output", str(link))) == 0
    assert link.is_symlink() and "depth_statistics" in load_checkpoint(target)


# ----- item 6: each writing command -----------------------------------------------------------------------------
def test_import_weights_never_replaces_a_users_file_its_input_or_a_special_file(tmp_path, capsys):
    source = tmp_path / "weights.pth"
    source.write_bytes(b"the authors' file")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    base = ["import-weights", "--model", "mobilenet_v2", str(source)]
    for output, fragment in (
        (notes, "exists and is not an adn checkpoint"),
        (source, "is this command's input"),
        (fifo, "is a named pipe, not a regular file"),
        (tmp_path, "is a folder"),
        ("", "--output is empty"),
    ):
        assert main([*base, "--output", str(output)]) == 2
        message = _error(capsys)
        assert fragment in message and "--output-dir" not in message and "disk" not in message, message
    assert main([*base, "--output", str(source), "--overwrite"]) == 2  # not even with --overwrite
    assert "is this command's input" in _error(capsys)
    assert notes.read_text() == "my notes\n" and source.read_bytes() == b"the authors' file" and fifo.is_fifo()


def test_recalibrate_output_rule(tmp_path, checkpoint, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert main(_recalibrate(checkpoint, "--output", str(notes))) == 2
    assert "exists and is not an adn checkpoint" in _error(capsys)
    assert notes.read_text() == "my notes\n"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert main(_recalibrate(checkpoint, "--output", str(fifo), "--overwrite")) == 2
    assert "not a regular file" in _error(capsys) and fifo.is_fifo()
    # its own output (an adn checkpoint) is replaced; a user's file with --overwrite
    copy = tmp_path / "copy.pt"
    copy.write_bytes(checkpoint.read_bytes())
    assert main(_recalibrate(checkpoint, "--output", str(copy))) == 0
    assert main(_recalibrate(checkpoint, "--output", str(notes), "--overwrite")) == 0
    assert "depth_statistics" in load_checkpoint(notes)
    # in place, its documented default, still works (the input is the output here by design)
    in_place = tmp_path / "in-place.pt"
    in_place.write_bytes(checkpoint.read_bytes())
    assert main(_recalibrate(in_place)) == 0 and "depth_statistics" in load_checkpoint(in_place)


def _eval_rows(path: Path) -> Path:
    rows = [{"skip": skip, "acc1": 50.0 + i, "macs": 1e6 * (3 - i)} for i, skip in enumerate(("TTT", "FTF", "FFF"))]
    path.write_text(json.dumps(rows))
    return path


def test_depth_table_output_rule(tmp_path, checkpoint, capsys):
    rows = _eval_rows(tmp_path / "eval.json")
    before = _digest(rows)
    base = [
        "depth-table",
        "--checkpoint",
        str(checkpoint),
        "--eval",
        str(rows),
        "--batch-sizes",
        "1",
        "--warmup",
        "0",
        "--repeats",
        "1",
    ]
    assert main([*base, "--output", str(rows), "--overwrite"]) == 2  # its own input, even with --overwrite
    assert "is this command's input (--eval" in _error(capsys) and _digest(rows) == before
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert main([*base, "--output", str(notes)]) == 2
    assert "is not a depth table" in _error(capsys) and notes.read_text() == "my notes\n"
    table = tmp_path / "table.json"
    assert main([*base, "--output", str(table)]) == 0
    assert main([*base, "--output", str(table)]) == 0  # its own earlier table: replaced
    assert json.loads(table.read_text())["format"] == "adn-depth-table"


def test_export_refuses_a_manifest_it_did_not_write(tmp_path, checkpoint, capsys):
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    base = ["export", "--checkpoint", str(checkpoint), "--skip", "super", "--output", str(folder)]
    assert main(base) == 2
    assert "manifest.json exists and is not an adn export's manifest" in _error(capsys)
    assert json.loads((folder / "manifest.json").read_text())["name"] == "my web app"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]
    (folder / "subnet_FFF.safetensors").write_text("someone else's file")
    assert main([*base, "--overwrite"]) == 0
    assert json.loads((folder / "manifest.json").read_text())["subnetworks"][0]["skip"] == "FFF"
    assert main(base) == 0  # an earlier adn export in the folder is replaced as before
    (tmp_path / "afile").write_text("x")
    assert main([*base[:-1], str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in _error(capsys)


def test_plots_and_saved_rows_follow_the_rule(tmp_path, capsys):
    rows = _eval_rows(tmp_path / "eval.json")
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (4, 4), "red").save(photo)
    before = _digest(photo)
    # A plot is not the result: the rows are printed, the plot is refused with a warning, the file kept.
    assert main(["pareto", "--eval", str(rows), "--plot", str(photo)]) == 0
    captured = capsys.readouterr()
    assert "FFF" in captured.out and "is not a plot adn wrote" in captured.err and _digest(photo) == before
    assert f"adn: warning: could not write the plot {photo}" in captured.err
    assert main(["pareto", "--eval", str(rows), "--plot", str(rows)]) == 0
    assert "is this command's input (--eval" in capsys.readouterr().err and json.loads(rows.read_text())
    plot = tmp_path / "pareto.png"
    assert main(["pareto", "--eval", str(rows), "--plot", str(plot)]) == 0
    assert main(["pareto", "--eval", str(rows), "--plot", str(plot)]) == 0  # its own plot: replaced
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    # eval-lm --save-json is checked before anything is read (the model here does not even exist)
    assert (
        main(["eval-lm", "--model", str(tmp_path / "no-model"), "--text", str(notes), "--save-json", str(notes)]) == 2
    )
    assert "is this command's input (--text" in _error(capsys) and notes.read_text() == "my notes\n"


def test_analyze_and_make_synthetic_leave_other_files_alone(tmp_path, checkpoint, capsys):
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "summary.json").write_text('{"my": "summary"}')
    assert main(["analyze", "--checkpoint", str(checkpoint), "--output", str(out), "--norm-distance"]) == 2
    assert "summary.json exists and is not a summary adn analyze wrote" in _error(capsys)
    assert (
        main(["analyze", "--checkpoint", str(checkpoint), "--output", str(out), "--norm-distance", "--overwrite"]) == 0
    )
    capsys.readouterr()
    assert main(["analyze", "--checkpoint", str(checkpoint), "--output", str(out), "--norm-distance"]) == 0
    data = tmp_path / "photos"
    data.mkdir()
    (data / "holiday.jpg").write_bytes(b"jpeg")
    assert (
        main(["detect", "make-synthetic", "--output", str(data), "--images", "1", "--val-images", "0", "--size", "32"])
        == 2
    )
    assert "holds other files" in _error(capsys)
    assert (
        main(
            [
                "detect",
                "make-synthetic",
                "--output",
                str(tmp_path / "coco"),
                "--images",
                "1",
                "--val-images",
                "0",
                "--size",
                "32",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "detect",
                "make-synthetic",
                "--output",
                str(tmp_path / "coco"),
                "--images",
                "1",
                "--val-images",
                "0",
                "--size",
                "32",
            ]
        )
        == 0
    )  # its own earlier dataset: written again


# ----- item 7: temporaries a killed write left -------------------------------------------------------------------
_WRITER = """
import sys, time
from adn.utils.atomic import atomic_write
def write(tmp):
    open(tmp, "wb").write(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(60)
atomic_write(sys.argv[1], write)
"""


def _start_writer(target: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(adn.__file__).parents[1])}
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, env=env)
    assert process.stdout.readline().strip() == b"writing"
    return process


def test_a_killed_writes_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    target = tmp_path / "model.pt"
    killed = _start_writer(target)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".model.pt.")]
    assert len(left) == 1  # what kill -9 leaves
    live = _start_writer(target)
    try:
        temporaries = {p for p in tmp_path.iterdir() if p.name.startswith(".model.pt.")}
        assert len(temporaries) == 2
        assert remove_stale_temporaries(tmp_path, ("model.pt.",)) == left  # the live writer's stays
        assert {p for p in tmp_path.iterdir() if p.name.startswith(".model.pt.")} == temporaries - set(left)
    finally:
        live.kill()
        live.wait()
    assert atomic_write(tmp_path / "other.txt", lambda tmp: Path(tmp).write_text("ok")).read_text() == "ok"


def test_commands_that_write_checkpoints_remove_stale_temporaries(tmp_path, checkpoint, capsys):
    output = tmp_path / "recalibrated.pt"
    stale = tmp_path / ".recalibrated.pt.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 4096)  # as a kill -9 during the write leaves it
    unrelated = tmp_path / ".notes.txt.abc.tmp"
    unrelated.write_text("another target's")
    time.sleep(0.01)
    assert main(_recalibrate(checkpoint, "--output", str(output))) == 0
    assert not stale.exists() and unrelated.exists() and output.is_file()
    assert "removed 1 temporary file(s)" in capsys.readouterr().err
    stale.write_bytes(b"\0")
    (tmp_path / "weights.pth").write_bytes(b"not read: the output is checked first")
    assert (
        main(["import-weights", "--model", "mobilenet_v2", str(tmp_path / "weights.pth"), "--output", str(output)]) == 2
    )
    assert not stale.exists()


# ----- item 14: write failures say what happened, with a flag that exists ---------------------------------------
@pytest.mark.parametrize(
    "error, flag, fragment",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "--output", "the disk is full"),
        (PermissionError(errno.EACCES, "Permission denied"), "--output", "permission denied"),
        (OSError(errno.EROFS, "Read-only file system"), "--output", "read-only"),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), "--output", "a folder is in the way"),
        (
            RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
            "--output-dir",
            "disk full",
        ),
    ],
)
def test_write_failures_name_their_cause(error, flag, fragment):
    message = write_failure(error, flag)
    assert fragment in message and flag in message
    if not isinstance(error, RuntimeError) and error.errno != errno.ENOSPC:
        assert "full" not in message


def test_a_failed_checkpoint_write_names_the_flag_it_was_given(tmp_path, monkeypatch):
    from adn.utils import checkpoint_file
    from adn.errors import CheckpointError

    def denied(path, write, suffix=".tmp"):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint_file, "atomic_write", denied)
    with pytest.raises(CheckpointError) as caught:
        checkpoint_file.atomic_save({"x": 1}, tmp_path / "m.pt", "--output")
    assert "permission denied" in str(caught.value) and "--output-dir" not in str(caught.value)
    assert "no m.pt was written" in str(caught.value)

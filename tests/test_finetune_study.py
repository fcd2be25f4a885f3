"""`adn reproduce-finetune --quick`: teachers, fine-tuning runs from them, caching, and the report."""

from __future__ import annotations

import json
import shutil

from adn.utils.checkpoint_file import load_checkpoint
from adn.cli import main
from adn.studies.finetune_report import target_status
from adn.studies.finetune_study import arm_name


def _argv(tmp_path, fashion_dir, *extra) -> list[str]:
    return [
        "reproduce-finetune",
        "--quick",
        "--runs",
        str(tmp_path / "ft"),
        "--docs",
        str(tmp_path / "docs" / "finetune.md"),
        "--reproduce-runs",
        str(tmp_path / "rep"),
        "--reproduce-record",
        str(tmp_path / "rep-record"),
        "--data-path",
        str(fashion_dir),
        "--seeds",
        "0",
        *extra,
    ]


def test_quick_study_fine_tunes_the_teachers_caches_and_reports(tmp_path, fashion_dir, capsys):
    report_path = tmp_path / "docs" / "finetune.md"
    # without teachers nothing trains: every fine-tuning run is pending, and the command says what to run
    assert main(_argv(tmp_path, fashion_dir)) == 0
    assert "pending: no checkpoint of individual-super seed 0" in capsys.readouterr().err
    assert "0 of 3 fine-tuning runs" in report_path.read_text()

    assert main(_argv(tmp_path, fashion_dir, "--train-teachers")) == 0
    report = report_path.read_text()
    assert "QUICK MODE" in report and "**3 of 3 fine-tuning runs**" in report
    assert "`individual-super` 1 of 1" in report and "`adn` 0 of 1" in report  # ADN from scratch: not trained here
    record = tmp_path / "docs" / "finetune" / "runs"
    for fraction in (0.1, 0.2, 0.3):
        for seed in (0,):
            folder = tmp_path / "ft" / arm_name(fraction) / f"seed{seed}"
            result = json.loads((folder / "result.json").read_text())
            assert len(result["accuracy"]) == 8 and all(0 <= v <= 100 for v in result["accuracy"].values())
            assert json.loads((record / arm_name(fraction) / f"seed{seed}" / "result.json").read_text()) == result
            teacher = tmp_path / "rep" / "individual-super" / f"seed{seed}" / "checkpoint.pt"
            meta = load_checkpoint(folder / "checkpoint.pt")["meta"]
            assert meta["config"]["init_from"] == str(teacher) and meta["method"] == "adn"
    # the individual super-net is compared at the super-net's depth; ADN from scratch is pending
    row = next(line for line in report.splitlines() if line.startswith("| FFF (super-net)"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[0] != "pending" and cells[1] == "pending" and all("±" in c for c in cells[2:])
    assert "| 10% | 1 | pending | **" in report  # the base-net target waits for the individual base-net

    # a second run reuses every cached run
    stamp = (tmp_path / "ft" / "finetune-10" / "seed0" / "checkpoint.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(_argv(tmp_path, fashion_dir)) == 0
    assert "adn train" not in capsys.readouterr().err
    assert (tmp_path / "ft" / "finetune-10" / "seed0" / "checkpoint.pt").stat().st_mtime_ns == stamp

    # on another machine (checkpoints gone) the records alone rebuild the report
    shutil.rmtree(tmp_path / "ft")
    shutil.rmtree(tmp_path / "rep")
    assert main(_argv(tmp_path, fashion_dir, "--report-only")) == 0
    assert report_path.read_text().split("## Test accuracy")[1] == report.split("## Test accuracy")[1]


def test_target_needs_every_seed_and_reads_the_difference():
    assert target_status([], [90.0, 90.1, 90.2], 3) == "pending"
    assert target_status([90.5, 90.6], [90.0, 90.1, 90.2], 3).startswith("pending (2 of 3 seeds: +")
    assert target_status([90.3, 90.4, 90.5], [90.0, 90.1, 90.2], 3).startswith("**met** (+0.30 points")
    assert target_status([89.5, 89.6, 89.7], [90.0, 90.1, 90.2], 3).startswith("**not met** (-0.50 points")
    # the super-net's target allows 0.3 points below the individual network
    assert target_status([89.9, 89.8, 89.7], [90.0, 90.1, 90.2], 3, margin=0.3).startswith("**met** (-0.30 points")


def test_methods_fine_tune_the_same_teacher_and_are_screened_on_held_out_images(tmp_path, fashion_dir):
    # Algorithm 1 with the base-net's label loss and joint training, from one teacher: each its own arm, with
    # its own command, and the report's screen table from the fine-tuning's held-out images
    argv = _argv(
        tmp_path, fashion_dir, "--train-teachers", "--fractions", "0.5", "--methods", "adn-base-ce0.5", "joint"
    )
    assert main(argv) == 0
    runs = {
        method: json.loads((tmp_path / "ft" / arm_name(0.5, method) / "seed0" / "result.json").read_text())
        for method in ("adn-base-ce0.5", "joint")
    }
    assert "--method adn --base-ce 0.5" in runs["adn-base-ce0.5"]["commands"][0]
    assert "--method joint --no-depth-statistics" in runs["joint"]["commands"][0]
    for method, result in runs.items():
        assert result["method"] == method and len(result["accuracy_recalibrated"]) == 8
        assert {"val_acc1_super", "val_acc1_base"} <= set(result["held_out"])
    report = (tmp_path / "docs" / "finetune.md").read_text()
    assert "**2 of 2 fine-tuning runs** (1 lengths x 2 methods x 1 seeds)" in report
    screen = report.split("## The screen")[1].split("##")[0]
    assert "| 50%, adn-base-ce0.5 |" in screen and "| 50%, joint |" in screen
    assert "fine-tuned 50%, joint" in report


def test_the_demo_protocol_reads_the_demo_study_and_refuses_quick(tmp_path, capsys):
    assert main(["reproduce-finetune", "--protocol", "demo", "--quick"]) != 0
    assert "leave out --protocol demo" in capsys.readouterr().err
    # with no demo networks anywhere every run is pending and the report says which teachers to train
    docs = tmp_path / "demo-finetune.md"
    argv = ["reproduce-finetune", "--protocol", "demo", "--docs", str(docs), "--reproduce-runs", str(tmp_path / "r")]
    assert main([*argv, "--reproduce-record", str(tmp_path / "rr"), "--runs", str(tmp_path / "ft")]) == 0
    report = docs.read_text()
    assert "**0 of 9 fine-tuning runs** (1 lengths x 3 methods x 3 seeds)" in report
    assert "make demo`'s schedule" in report and "--val-from-train 5000" in report
    assert "--method adn --base-ce 0.5" in report and "--method joint --no-depth-statistics" in report

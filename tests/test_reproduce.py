"""`adn reproduce --quick` runs every arm of the reproduction and writes the report; `adn analyze`
looks inside a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adn.vision.analyze import AnalysisError, gradcam, norm_distances
from adn.cli import main
from adn.convert import convert
from adn.models import build_model
from adn.studies.reproduce import ARMS, verdict


def test_verdict_needs_a_difference_beyond_the_spread():
    assert verdict([90.0, 90.2, 90.1], [89.0, 89.1, 88.9]) == "holds"
    assert verdict([89.0, 89.1, 88.9], [90.0, 90.2, 90.1]) == "fails"
    assert verdict([90.0, 91.0, 89.0], [89.9, 90.5, 89.5]) == "within noise"


def test_quick_reproduction_writes_every_section_and_caches_runs(tmp_path, fashion_dir, capsys):
    runs, docs = tmp_path / "runs", tmp_path / "docs" / "reproduction.md"
    record = docs.parent / "reproduction" / "runs"
    argv = [
        "reproduce",
        "--quick",
        "--runs",
        str(runs),
        "--docs",
        str(docs),
        "--data-path",
        str(fashion_dir),
        "--jobs",
        "2",
    ]
    assert main(argv) == 0
    report = docs.read_text()
    for heading in (
        "Table 1 counterpart",
        "Table 3 counterpart",
        "Figure 3a",
        "Figure 3b",
        "Figure 4",
        "Feature distillation",
        "QUICK MODE",
        "plateaued",
        "14 of 14 runs",
        "recalibrated BN",
        "sub-path specialization matters",
        "Our recommendation for training from scratch",
        "The simpler alternative, `--method joint --no-skip-aware-norm`",
    ):
        assert heading in report
    for figure in ("fig3a_subnetworks.png", "fig3b_norm_distances.png", "fig4_gradcam.png", "learning_curves.png"):
        assert (docs.parent / "reproduction" / figure).stat().st_size > 10_000
    for arm in ARMS:
        for seed in (0, 1):
            result = json.loads((runs / arm / f"seed{seed}" / "result.json").read_text())
            assert result["accuracy"] and all(0 <= v <= 100 for v in result["accuracy"].values())
            assert result["accuracy_recalibrated"].keys() == result["accuracy"].keys()
            # the record kept in version control: enough to rebuild the report without checkpoints
            assert json.loads((record / arm / f"seed{seed}" / "result.json").read_text()) == result
            assert (record / arm / f"seed{seed}" / "log.jsonl").is_file()
    assert len(json.loads((runs / "adn" / "seed0" / "result.json").read_text())["accuracy"]) == 8

    # A second run reuses every cached run: nothing is trained again.
    stamp = (runs / "adn" / "seed0" / "checkpoint.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert (runs / "adn" / "seed0" / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert "adn train" not in capsys.readouterr().err

    # On a fresh machine (checkpoints gone), the record alone rebuilds the report and nothing retrains.
    import shutil

    shutil.rmtree(runs)
    assert main(argv[:-2] + ["--report-only"]) == 0
    assert not runs.exists() or not any(runs.rglob("checkpoint.pt"))
    assert docs.read_text().split("## Protocol")[1] == report.split("## Protocol")[1]


def test_training_cpu_time_is_unknown_for_logs_that_did_not_record_it(tmp_path):
    from adn.studies.reproduce import training_cpu_seconds

    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1, "epoch_time_s": 9.0}\n{"epoch": 2, "epoch_time_s": 9.0, "epoch_cpu_s": 8.0}\n')
    assert training_cpu_seconds(log) is None  # an epoch from before CPU time was measured
    log.write_text('{"epoch": 1, "epoch_cpu_s": 7.5}\n{"epoch": 2, "epoch_cpu_s": 8.0}\n')
    assert training_cpu_seconds(log) == 15.5
    assert training_cpu_seconds(tmp_path / "missing.jsonl") is None


def test_a_partial_protocol_reports_what_has_finished(tmp_path, fashion_dir):
    from adn.studies.reproduce import Protocol, reproduce, run_arm

    runs, docs = tmp_path / "runs", tmp_path / "reproduction.md"
    protocol = Protocol.quick()
    protocol.data_path = str(fashion_dir)
    report = reproduce(protocol, runs, docs, report_only=True).read_text()  # nothing has run yet
    assert "0 of 14 runs" in report and "Pending: no finished run" in report
    run_arm(
        protocol,
        "individual-super",
        0,
        runs,
        tmp_path / "reproduction" / "runs",
        log=lambda message: None,
        run_command=main,
    )
    report = reproduce(protocol, runs, docs, report_only=True).read_text()  # no ADN run yet
    assert "1 of 14 runs" in report and "Pending: no finished ADN run" in report
    run_arm(protocol, "adn", 0, runs, tmp_path / "reproduction" / "runs", log=lambda message: None, run_command=main)
    report = reproduce(protocol, runs, docs, report_only=True).read_text()
    assert "2 of 14 runs" in report and "pending" in report


def test_analyze_writes_norm_distance_and_gradcam(tmp_path, fashion_dir, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
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
                "3",
                "--output-dir",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    from PIL import Image

    picture = tmp_path / "shirt.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(picture)
    out = tmp_path / "analysis"
    capsys.readouterr()
    assert (
        main(
            [
                "analyze",
                "--checkpoint",
                str(run / "checkpoint.pt"),
                "--output",
                str(out),
                "--norm-distance",
                "--gradcam",
                str(picture),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) >= {"norm_distance", "gradcam"}
    rows = json.loads((out / "norm_distance.json").read_text())
    assert {r["stage"] for r in rows} == {0, 1, 2}
    assert (out / "gradcam.png").is_file() and (out / "norm_distance.png").is_file()
    # skipped blocks of the base-net have no map
    assert summary["gradcam"]["hot_fraction"]["skip TTT"][-1] is None

    assert main(["analyze", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(out)]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert (
        main(
            [
                "analyze",
                "--checkpoint",
                str(run / "checkpoint.pt"),
                "--output",
                str(out),
                "--gradcam",
                str(tmp_path / "missing.png"),
            ]
        )
        == 2
    )
    assert "missing.png" in capsys.readouterr().err


def test_norm_distance_is_zero_for_fresh_twins_and_needs_twins():
    net = convert(build_model("resnet20", num_classes=10, in_channels=1, width=4))
    assert all(r["distance"] == 0 for r in norm_distances(net))
    with pytest.raises(AnalysisError, match="no skip-aware norm"):
        norm_distances(convert(build_model("resnet20", num_classes=10, in_channels=1, width=4), skip_aware_norm=False))


def test_gradcam_maps_are_normalized_and_follow_the_depth():
    net = convert(build_model("resnet20", num_classes=10, in_channels=1, width=4)).eval()
    images = torch.randn(2, 1, 28, 28)
    full, base = gradcam(net, images, 1, "FFF"), gradcam(net, images, 1, "TTT")
    assert all(m.shape == (2, 28, 28) and 0 <= m.min() and m.max() <= 1 + 1e-6 for m in full)
    assert base[-1] is None and base[0] is not None
    assert str(net.skip) == "FFF"  # the caller's depth is restored
    with pytest.raises(AnalysisError, match="stage 5"):
        gradcam(net, images, 5, "FFF")


def test_the_reproduction_record_is_versioned_not_ignored():
    # The record (result.json + log.jsonl per finished run) is what lets the protocol continue on another
    # machine; a .gitignore pattern that caught it would silently lose every run.
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("results/reproduction/runs/adn/seed0/result.json", "results/reproduction/runs/adn/seed0/log.jsonl"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0
        assert not ignored, f"{path} is git-ignored: fix .gitignore"
    assert (
        subprocess.run(["git", "check-ignore", "-q", "runs/reproduce/adn/seed0/checkpoint.pt"], cwd=root).returncode
        == 0
    )


def test_an_interrupted_run_continues_from_its_checkpoint_with_the_same_result(tmp_path, fashion_dir):
    """A session that stops in the middle of a run loses none of its finished epochs: the next
    `adn reproduce` resumes it (`adn train --resume`), and the result equals an uninterrupted run's."""
    from adn.studies.reproduce import PENDING, Protocol, cache_key, run_arm

    protocol = Protocol.quick()
    protocol.data_path = str(fashion_dir)
    quiet = dict(log=lambda message: None)
    whole = run_arm(protocol, "individual-super", 0, tmp_path / "whole", **quiet, run_command=main)
    assert not (tmp_path / "whole" / "individual-super" / "seed0" / PENDING).exists()

    # The same run, stopped after its first epoch: its checkpoint and the pending marker are left behind.
    folder = tmp_path / "cut" / "individual-super" / "seed0"
    first_epoch = protocol.commands("individual-super", 0, folder)[0]
    first_epoch[first_epoch.index("--epochs") + 1] = "1"
    assert main(first_epoch) == 0
    (folder / PENDING).write_text(json.dumps({"key": cache_key(protocol, "individual-super", 0)}))
    # as if the first epoch had taken long, in an earlier session: its time counts in train_s, not against
    # the evaluation's
    first = json.loads((folder / "log.jsonl").read_text())
    (folder / "log.jsonl").write_text(json.dumps({**first, "epoch_time_s": 1000.0}) + "\n")
    seen = []
    result = run_arm(
        protocol,
        "individual-super",
        0,
        tmp_path / "cut",
        **quiet,
        run_command=lambda args: seen.append(args) or main(args),
    )
    assert "--resume" in seen[0] and result["resumed"]
    assert result["accuracy"] == whole["accuracy"]
    assert result["train_s"] > 1000 and 0 < result["eval_s"] < 1000
    epochs = [json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and not (folder / PENDING).exists()
    # CPU time (not wall time, which grows while a run is paused) covers both epochs, before and after
    # the interruption
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert result["train_cpu_s"] == pytest.approx(sum(row["epoch_cpu_s"] for row in rows)) and result["train_cpu_s"] > 0

    # A marker from other commands (an older protocol) is not resumed: the run starts afresh.
    (folder / "result.json").unlink()
    (folder / PENDING).write_text(json.dumps({"key": ["adn train --epochs 99"]}))
    seen.clear()
    run_arm(
        protocol,
        "individual-super",
        0,
        tmp_path / "cut",
        **quiet,
        run_command=lambda args: seen.append(args) or main(args),
    )
    assert "--resume" not in seen[0]


def test_records_go_to_results_only_for_the_projects_own_report(tmp_path):
    # A report written elsewhere (a user's experiment, this suite's temporary folders) keeps its runs beside
    # it: it must never mix quick or foreign runs into the project's committed records.
    from adn.cli.common import record_folder
    from adn.cli.reproduce import DEFAULT_DOCS, DEFAULT_RECORD

    assert record_folder(None, DEFAULT_DOCS, DEFAULT_DOCS, DEFAULT_RECORD) == Path("results/reproduction/runs")
    elsewhere = tmp_path / "report.md"
    assert record_folder(None, str(elsewhere), DEFAULT_DOCS, DEFAULT_RECORD) == tmp_path / "report" / "runs"
    assert record_folder("mine", str(elsewhere), DEFAULT_DOCS, DEFAULT_RECORD) == Path("mine")

"""`adn train` without a method flag trains the best recipe we measured (joint, skip-aware norms) and stores
each depth's batch-norm statistics itself, so that `adn eval` needs no second command; the paper's
Algorithm 1 stays one flag away (`--method adn`), unchanged."""

import json
import shutil

import pytest
import torch

from adn.cli import main
from adn.core.depth_statistics import CHECKPOINT_KEY
from adn.utils.checkpoint_file import load_checkpoint
from adn.vision.stored_statistics import BATCHES
from adn.vision.train_config import TrainConfig
from tests.conftest import tiny_train

EVAL = ["eval", "--no-latency", "--no-plot", "--json", "--skip", "all"]


def _train(folder, fashion_dir, *extra):
    return main(
        tiny_train(
            fashion_dir,
            folder,
            "--lr",
            "0.5",
            "--recalibrate-bn",
            "0",
            "--depth-statistics-batches",
            "1",
            *extra,
            steps=3,
        )
    )


def _eval(checkpoint, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(EVAL + ["--checkpoint", str(checkpoint)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, fashion_dir):
    folder = tmp_path_factory.mktemp("default") / "run"
    assert _train(folder, fashion_dir) == 0
    return folder / "checkpoint.pt"


def test_the_default_trains_jointly_and_stores_every_depths_statistics(default_run):
    assert TrainConfig().method == "joint" and TrainConfig().depth_statistics_batches == BATCHES
    ckpt = load_checkpoint(default_run)
    assert ckpt["meta"]["method"] == "joint" and ckpt["meta"]["skip_aware_norm"]
    stored = ckpt[CHECKPOINT_KEY]
    assert stored["measured_by"] == "adn train" and len(stored["depths"]) == 8
    assert stored["images"] == 256  # --depth-statistics-batches 1: one batch of 256 images per depth


def test_eval_reads_the_same_numbers_as_after_adn_recalibrate(default_run, tmp_path, capsys):
    again = tmp_path / "recalibrated.pt"
    shutil.copyfile(default_run, again)
    assert main(["recalibrate", "--checkpoint", str(again), "--batches", "1"]) == 0  # measured afresh
    ours, theirs = load_checkpoint(default_run)[CHECKPOINT_KEY], load_checkpoint(again)[CHECKPOINT_KEY]
    assert ours["depths"] == theirs["depths"] and ours["images"] == theirs["images"]
    for name, table in ours["norms"].items():
        assert torch.equal(table["mean"], theirs["norms"][name]["mean"]), name
        assert torch.equal(table["var"], theirs["norms"][name]["var"]), name
    rows, recalibrated = _eval(default_run, capsys), _eval(again, capsys)
    assert [(r["skip"], r["acc1"], r["acc5"]) for r in rows] == [
        (r["skip"], r["acc1"], r["acc5"]) for r in recalibrated
    ]
    assert {r["bn_statistics"] for r in rows} == {"per depth (256 training images each, adn train)"}
    assert {r["bn_statistics"] for r in recalibrated} == {"per depth (256 training images each, adn recalibrate)"}


def test_a_finished_run_resumed_measures_nothing_again(default_run, tmp_path, fashion_dir, capsys):
    folder = tmp_path / "resumed"
    folder.mkdir()
    shutil.copyfile(default_run, folder / "checkpoint.pt")
    before = (folder / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert _train(folder, fashion_dir, "--resume", str(folder / "checkpoint.pt")) == 0
    assert "holds them already" in capsys.readouterr().err
    assert (folder / "checkpoint.pt").read_bytes() == before


def test_no_depth_statistics_stores_none_and_a_resumed_run_adds_them(default_run, tmp_path, fashion_dir, capsys):
    folder = tmp_path / "without"
    capsys.readouterr()
    assert _train(folder, fashion_dir, "--no-depth-statistics") == 0
    checkpoint = folder / "checkpoint.pt"
    assert f"next: adn recalibrate --checkpoint {checkpoint}" in capsys.readouterr().err
    plain = load_checkpoint(checkpoint)
    assert plain.get(CHECKPOINT_KEY) is None
    trained = load_checkpoint(default_run)
    assert all(torch.equal(plain["model"][k], trained["model"][k]) for k in trained["model"])  # the same training
    # Finished, but without them: resuming it (nothing left to train) stores them, as the default run did.
    assert _train(folder, fashion_dir, "--resume", str(checkpoint)) == 0
    stored = load_checkpoint(checkpoint)[CHECKPOINT_KEY]
    for name, table in trained[CHECKPOINT_KEY]["norms"].items():
        assert torch.equal(table["mean"], stored["norms"][name]["mean"]), name


def test_the_papers_algorithm_1_is_one_flag_away_and_unchanged(tmp_path, fashion_dir, capsys):
    folder = tmp_path / "paper"
    capsys.readouterr()
    assert _train(folder, fashion_dir, "--method", "adn") == 0
    err = capsys.readouterr().err
    assert "method=adn" in err and "batch-norm statistics" not in err and "adn recalibrate" not in err
    ckpt = load_checkpoint(folder / "checkpoint.pt")
    assert ckpt["meta"]["method"] == "adn" and ckpt["meta"]["config"]["base_ce"] == 0.0
    assert ckpt.get(CHECKPOINT_KEY) is None  # evaluated on its running statistics, as the paper does
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"train_ce_super", "train_kd_features", "train_kd_logits"} <= set(log[0])
    # Asked for, it stores them too (the same measurement).
    assert _train(tmp_path / "paper-stats", fashion_dir, "--method", "adn", "--depth-statistics") == 0
    assert load_checkpoint(tmp_path / "paper-stats" / "checkpoint.pt")[CHECKPOINT_KEY]["measured_by"] == "adn train"


def test_resuming_a_checkpoint_of_another_method_names_the_flag(tmp_path, fashion_dir, capsys):
    folder = tmp_path / "old-default"
    assert _train(folder, fashion_dir, "--method", "adn") == 0
    capsys.readouterr()
    assert _train(folder, fashion_dir, "--epochs", "2", "--resume", str(folder / "checkpoint.pt")) == 2
    assert "add --method adn" in capsys.readouterr().err


def test_a_failed_measurement_is_a_warning_and_leaves_the_checkpoint_whole(tmp_path, fashion_dir, capsys, monkeypatch):
    import adn.vision.stored_statistics as stored_statistics

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(stored_statistics, "record_depth_statistics", broken)
    folder = tmp_path / "broken"
    capsys.readouterr()
    assert _train(folder, fashion_dir) == 0
    err = capsys.readouterr().err
    assert "warning: could not store per-depth batch-norm statistics" in err and "disk on fire" in err
    assert f"adn recalibrate --checkpoint {folder / 'checkpoint.pt'}" in err
    assert load_checkpoint(folder / "checkpoint.pt").get(CHECKPOINT_KEY) is None

"""Checkpoints that survive: a run killed with SIGKILL mid-epoch resumes to the very weights and metrics
of an uninterrupted run; mid-epoch checkpoints restore everything (EMA, MixUp's RNG, position in the
epoch); --keep-last rotates; a damaged checkpoint is named and leaves the earlier ones usable."""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from adn.training import rng
from adn.errors import CheckpointError
from adn.utils.checkpoint_file import load_checkpoint, numbered_checkpoints
from adn.cli import main
from adn.vision.train_config import TrainConfig
from adn.vision.train import train
from tests.conftest import write_idx


def _log(folder) -> list[dict]:
    return [json.loads(line) for line in open(Path(folder) / "log.jsonl")]


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "epoch_cpu_s")} for r in records]


def _same_weights(a, b) -> None:
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def one_thread():
    # The same thread count in the killed, the resumed and the uninterrupted run keeps float sums in the
    # same order, so "equal" can mean bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_in_child(argv: list[str]) -> None:
    torch.set_num_threads(1)  # as the parent's runs (the one_thread fixture)
    os._exit(main(argv))


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, one_thread):
    data = write_idx(tmp_path / "data", n_train=640, n_test=64)  # 40 steps: time to kill it mid-epoch
    args = [
        "train",
        "--model",
        "resnet20",
        "--width",
        "4",
        "--data",
        "fashion-mnist",
        "--data-path",
        str(data),
        "--epochs",
        "1",
        "-b",
        "16",
        "--lr",
        "0.05",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--no-progress",
        "--save-every-steps",
        "3",
        "--keep-last",
        "100",
    ]
    killed = tmp_path / "killed"
    # A child process runs `adn train` as `python -m adn train` would. Spawned, not forked: forking a
    # process whose earlier tests started OpenMP/ONNX Runtime thread pools can deadlock the child.
    child = multiprocessing.get_context("spawn").Process(
        target=_train_in_child, args=([*args, "--output-dir", str(killed)],)
    )
    child.start()
    try:
        deadline = time.monotonic() + 180
        # The numbered file is written first, then published as checkpoint.pt: wait for both.
        while not ((killed / "checkpoint-e0001-s0000003.pt").exists() and (killed / "checkpoint.pt").exists()):
            assert child.is_alive(), f"training stopped early (exit code {child.exitcode})"
            assert time.monotonic() < deadline, "no step checkpoint after 180 s"
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL
    latest = load_checkpoint(killed / "checkpoint.pt")
    assert latest["step_in_epoch"] is not None, "killed in the middle of the epoch"
    for path in killed.glob("*.pt"):  # whatever moment the kill hit, every checkpoint file is whole
        load_checkpoint(path)

    assert main([*args, "--output-dir", str(killed), "--resume", str(killed / "checkpoint.pt")]) == 0
    assert not list(killed.glob(".*.tmp")), "temporary files of the killed run are cleaned up"
    straight = tmp_path / "straight"
    assert main([*args, "--output-dir", str(straight)]) == 0
    _same_weights(killed / "checkpoint.pt", straight / "checkpoint.pt")
    assert _without_time(_log(killed)) == _without_time(_log(straight))
    assert _log(killed)[0]["steps"] == 40


def _config(tmp_path, fashion_dir, **overrides) -> TrainConfig:
    values = dict(
        model="resnet20",
        width=4,
        data="fashion-mnist",
        data_path=str(fashion_dir),
        epochs=2,
        batch_size=32,
        lr=0.05,
        progress=False,
        seed=1,
        device="cpu",
        max_steps_per_epoch=6,
        mixup_alpha=0.2,
        model_ema=True,
        model_ema_steps=1,
        val_subset=64,
        output_dir=str(tmp_path / "straight"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_mid_epoch_checkpoints_restore_everything_and_rotate(tmp_path, fashion_dir):
    # MixUp draws from the global RNG every step and the EMA changes every step: both must be restored.
    straight = _config(tmp_path, fashion_dir)
    train(straight)
    saved = _config(tmp_path, fashion_dir, output_dir=str(tmp_path / "saved"), save_every_steps=2, keep_checkpoints=3)
    train(saved)
    names = [p.name for p in numbered_checkpoints(saved.output_dir)]
    assert names == ["checkpoint-e0002-s0000002.pt", "checkpoint-e0002-s0000004.pt", "checkpoint-e0002-s0000006.pt"]
    assert (Path(saved.output_dir) / "checkpoint.pt").read_bytes() == (Path(saved.output_dir) / names[-1]).read_bytes()
    middle = load_checkpoint(Path(saved.output_dir) / names[0])
    assert (middle["epoch"], middle["step_in_epoch"], middle["global_step"]) == (1, 2, 8)
    assert {"model_ema", "rng", "progress", "optimizer"} <= set(middle)

    resumed = _config(
        tmp_path, fashion_dir, output_dir=str(tmp_path / "resumed"), resume=str(Path(saved.output_dir) / names[0])
    )
    train(resumed)
    _same_weights(Path(resumed.output_dir) / "checkpoint.pt", Path(straight.output_dir) / "checkpoint.pt")
    ema = [load_checkpoint(Path(c.output_dir) / "checkpoint.pt")["model_ema"] for c in (resumed, straight)]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[1])
    # The resumed epoch's metrics cover all its steps, those before the checkpoint included.
    assert _without_time(_log(resumed.output_dir)) == _without_time(_log(straight.output_dir)[1:])

    other_batch = _config(
        tmp_path,
        fashion_dir,
        output_dir=str(tmp_path / "other"),
        batch_size=16,
        resume=str(Path(saved.output_dir) / names[0]),
    )
    with pytest.raises(CheckpointError, match="32 images per step"):
        train(other_batch)


def test_a_damaged_checkpoint_is_named_and_earlier_ones_still_resume(tmp_path, fashion_dir):
    cfg = _config(
        tmp_path,
        fashion_dir,
        epochs=1,
        max_steps_per_epoch=4,
        mixup_alpha=0.0,
        model_ema=False,
        save_every_steps=2,
        keep_checkpoints=5,
    )
    train(cfg)
    folder = Path(cfg.output_dir)
    latest = folder / "checkpoint.pt"
    with open(latest, "r+b") as handle:  # damaged in place (disk trouble): the file and its hard link
        handle.truncate(latest.stat().st_size // 2)
    with pytest.raises(
        CheckpointError, match="truncated, corrupted.*earlier checkpoints in .*checkpoint-e0001-s0000002.pt"
    ):
        load_checkpoint(latest)
    earlier = folder / "checkpoint-e0001-s0000002.pt"
    assert load_checkpoint(earlier)["step_in_epoch"] == 2
    train(
        _config(
            tmp_path,
            fashion_dir,
            epochs=1,
            max_steps_per_epoch=4,
            mixup_alpha=0.0,
            model_ema=False,
            resume=str(earlier),
            output_dir=str(tmp_path / "again"),
        )
    )
    assert load_checkpoint(tmp_path / "again" / "checkpoint.pt")["step_in_epoch"] is None


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path):
    import random

    import numpy as np

    rng.seed_all(5)
    state = rng.capture()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    random.random(), np.random.rand(), torch.rand(1)  # move every stream on
    rng.restore(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == expected[1:]
    rng.restore(state)
    assert torch.equal(torch.rand(3), expected[0])


def test_a_run_killed_before_publishing_its_first_checkpoint_names_the_numbered_one(tmp_path):
    """Killed between writing checkpoint-e*-s*.pt and publishing it as checkpoint.pt: resuming from
    checkpoint.pt fails with a message that names the file that is there."""
    import adn
    from adn.utils.checkpoint_file import checkpoint_payload
    from adn.training.run_folder import save_rotating

    net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4))
    save_rotating(tmp_path, checkpoint_payload(net, {}), epoch=1, step=3, keep_last=2)
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match="earlier checkpoints in .*checkpoint-e0001-s0000003.pt"):
        load_checkpoint(tmp_path / "checkpoint.pt")

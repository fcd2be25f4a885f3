"""Issue 25, item 1: one run loop (adn.training.loop) under all three training commands. ``adn train``,
``adn detect train`` and ``adn train-lm`` alike refuse a folder another live run holds (changing nothing in
it), keep the steps done on Ctrl-C/SIGTERM in a checkpoint that ``--resume`` continues from, and stop on a
non-finite loss with a message, writing no non-finite checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from adn.cli import main
from adn.detection.train import DetectionTask
from adn.errors import TrainingDiverged, TrainingInterrupted
from adn.training.distributed import Distributed
from adn.training.loop import Checkpoint, Period, RunLoop
from adn.training.run_folder import LOCK_NAME, RunLock
from adn.utils.checkpoint_file import load_checkpoint
from adn.vision.train import Trainer

try:  # the language-model task needs the lm extra; the other two tasks are tested without it
    from adn.lm.train import LMTask

    from .test_lm import tiny
except (ImportError, pytest.skip.Exception):
    LMTask = tiny = None

TASKS = ("train", "detect", "lm")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    assert (
        main(
            [
                "detect",
                "make-synthetic",
                "--output",
                str(root),
                "--images",
                "8",
                "--val-images",
                "2",
                "--size",
                "64",
                "--seed",
                "3",
                "--json",
            ]
        )
        == 0
    )
    return root


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a tiny BPE tokenizer trained on the README (as in test_lm)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([readme], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    tiny(vocab=256).save_pretrained(folder)
    return folder


@pytest.fixture
def command(request, fashion_dir, tmp_path):
    """``argv(out, steps, *extra)`` of a tiny run of one of the three commands, and the task's class."""
    task = request.param
    if task == "lm" and LMTask is None:
        pytest.skip("the language-model task needs the lm extra (pip install 'adn[lm]')")
    if task == "detect":
        pytest.importorskip("pycocotools", reason="detection needs the detection extra (pip install 'adn[detection]')")
    if task == "train":

        def argv(out, steps, *extra):
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
                "16",
                "--max-steps-per-epoch",
                str(steps),
                "--val-subset",
                "16",
                "--recalibrate-bn",
                "0",
                "--output-dir",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
                *extra,
            ]

        return task, argv
    if task == "detect":
        root = request.getfixturevalue("shapes")

        def argv(out, steps, *extra):
            return [
                "detect",
                "train",
                "--model",
                "fasterrcnn_resnet18_fpn",
                "--data-path",
                str(root),
                "-b",
                "2",
                "-j",
                "0",
                "--epochs",
                "1",
                "--max-steps-per-epoch",
                str(steps),
                "--fpn-channels",
                "16",
                "--min-size",
                "64",
                "--max-size",
                "64",
                "--rpn-proposals-train",
                "50",
                "--rpn-proposals-test",
                "20",
                "--box-batch-size-per-image",
                "16",
                "--detections-per-image",
                "5",
                "--val-subset",
                "2",
                "--output-dir",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
                *extra,
            ]

        return task, argv
    model = request.getfixturevalue("lm_dir")
    text = str(Path(__file__).parents[1] / "docs" / "method.md")

    def argv(out, steps, *extra):
        return [
            "train-lm",
            "--model",
            str(model),
            "--text",
            text,
            "--output-dir",
            str(out),
            "--steps",
            str(steps),
            "-b",
            "2",
            "--seq-len",
            "16",
            "--eval-tokens",
            "32",
            "--eval-every",
            "100",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "1",
            "--no-progress",
            "--train",
            "twins",
            *extra,
        ]

    return task, argv


def _fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("adn: ")]
    assert lines, err[-2000:]
    return lines[-1]


def _after_steps(monkeypatch, task: str, steps: int, action) -> None:
    """Run ``action(task object)`` right after the ``steps``-th optimizer step of the task."""
    cls, name = {"train": (Trainer, "train_step"), "detect": (DetectionTask, "update"), "lm": (LMTask, "update")}[task]
    original, done = getattr(cls, name), []

    def hooked(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        done.append(1)
        if len(done) == steps:
            action(self)
        return result

    monkeypatch.setattr(cls, name, hooked)


@pytest.mark.parametrize("command", TASKS, indirect=True)
def test_a_folder_another_live_run_holds_is_refused_and_left_as_it_was(command, capsys, tmp_path):
    _, argv = command
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("the other run's file\n")
    other = RunLock(folder).acquire()  # a live run holds the folder (the OS lock, as in another process)
    try:
        before = _fingerprint(folder)
        assert main(argv(folder, 2)) == 2
        message = _error(capsys)
        assert "is in use by another adn" in message and f"pid {os.getpid()}" in message, message
        assert "choose another --output-dir" in message
        assert _fingerprint(folder) == before
    finally:
        other.release()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "command, signum",
    [("train", signal.SIGINT), ("detect", signal.SIGINT), ("detect", signal.SIGTERM), ("lm", signal.SIGTERM)],
    indirect=["command"],
)
def test_a_stop_signal_saves_a_checkpoint_that_resume_continues(command, signum, capsys, monkeypatch, tmp_path):
    """Ctrl-C (SIGINT) or kill (SIGTERM) after 2 of 3 steps (adn train's own tests cover both signals)."""
    task, argv = command
    status = 128 + signum
    folder = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    _after_steps(monkeypatch, task, 2, lambda _: signal.raise_signal(signum))
    assert main(argv(folder, 3)) == status
    message = _error(capsys)
    name = signal.Signals(signum).name
    assert message.startswith(f"adn: interrupted: {name} at ") and "step 2 of 3" in message, message
    assert f"--resume {folder / 'checkpoint.pt'}" in message
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert not (folder / LOCK_NAME).exists()
    saved = load_checkpoint(folder / "checkpoint.pt")
    assert (saved["step"] if task == "lm" else saved["step_in_epoch"]) == 2

    monkeypatch.undo()
    assert main([*argv(folder, 3), "--resume", str(folder / "checkpoint.pt")]) == 0
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    if task == "lm":
        assert [r["step"] for r in log] == [0, 1, 2, 3] and load_checkpoint(folder / "checkpoint.pt")["step"] == 3
    else:
        assert [(r["epoch"], r["steps"]) for r in log] == [(1, 3)]
        assert load_checkpoint(folder / "checkpoint.pt")["step_in_epoch"] is None


def _nan_loss(monkeypatch, task: str) -> None:
    """The task's second step reports a NaN loss."""
    if task == "train":  # whichever method the command trains with (joint, the default)
        for step in ("adn_step", "joint_step", "individual_step"):
            monkeypatch.setattr(f"adn.vision.train.{step}", _nan_terms)
        return
    cls = {"detect": DetectionTask, "lm": LMTask}[task]
    original, calls = cls.step, []

    def step(self, batch):
        terms = original(self, batch)
        calls.append(1)
        return {**terms, "loss": math.nan} if len(calls) == 2 else terms

    monkeypatch.setattr(cls, "step", step)


def _nan_terms(net, images, targets, *args, **kwargs) -> dict:
    return {"terms": {"loss": math.nan}, "logits": {"FFF": torch.zeros(len(targets), 10)}}


@pytest.mark.parametrize("command", TASKS, indirect=True)
def test_a_nan_loss_stops_the_run_with_a_message_and_no_checkpoint(command, capsys, monkeypatch, tmp_path):
    task, argv = command
    folder = tmp_path / "run"
    _nan_loss(monkeypatch, task)
    assert main(argv(folder, 3)) == 2
    message = _error(capsys)
    where = "step 1" if task == "train" else "step 2"  # (adn train: every step is NaN)
    assert message.startswith("adn: error: loss is not finite at ") and where in message, message
    assert "No checkpoint was written yet" in message and "lower --lr" in message
    assert not (folder / "checkpoint.pt").exists() and not (folder / LOCK_NAME).exists()


@pytest.mark.parametrize("command", ["detect", "lm"], indirect=True)
def test_weights_that_became_nan_are_never_saved(command, capsys, monkeypatch, tmp_path):
    """(adn train: tests/test_train.py.) The loss of the step was finite, the weights after it are not:
    the checkpoint before is kept as it was."""
    task, argv = command
    folder = tmp_path / "run"
    first, more = (argv(folder, 2), ["--epochs", "2"]) if task == "detect" else (argv(folder, 1), ["--steps", "2"])
    assert main(first) == 0
    before = _fingerprint(folder)["checkpoint.pt"]

    def poison(obj):  # after the last step: no loss sees the NaN weights, only the save could
        with torch.no_grad():
            next(p for p in obj.module.parameters() if p.requires_grad).fill_(math.nan)

    _after_steps(monkeypatch, task, 2 if task == "detect" else 1, poison)
    assert main([*first, *more, "--resume", str(folder / "checkpoint.pt")]) == 2
    message = _error(capsys)
    assert "weight tensors became NaN or infinite" in message and "they were not saved" in message, message
    assert f"The last good checkpoint ({folder / 'checkpoint.pt'}) is kept" in message
    assert _fingerprint(folder)["checkpoint.pt"] == before


class Counting:
    """A task of a few lines: one period of steps with the given losses."""

    module, log_key, advice = torch.nn.Linear(2, 2), "step", "try something else"

    def __init__(self, losses):
        self.losses, self.done, self.updates = losses, 0, 0

    def resumed(self):
        return None

    def start(self):
        return None

    def periods(self):
        return range(1)

    def period(self, index):
        return Period(range(len(self.losses)), total=len(self.losses))

    def step(self, batch):
        return {"loss": self.losses[batch]}

    def update(self, terms):
        self.done += 1
        return {"step": self.done, **terms}

    def save_due(self):
        return False

    def end_period(self, index):
        return None

    def where(self, pending):
        return f"at step {self.done + int(pending)}"

    def checkpoint(self, record):
        return Checkpoint({"step": self.done}, 1, self.done)


def test_the_loop_knows_no_task(tmp_path):
    """A task of a few lines gets the whole run: log, checkpoint, lock released, NaN caught before its update."""
    RunLoop(Counting([1.0, 0.5]), tmp_path / "ok", progress=False).run()
    assert [json.loads(line)["step"] for line in (tmp_path / "ok" / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert torch.load(tmp_path / "ok" / "checkpoint.pt")["step"] == 2
    assert not (tmp_path / "ok" / LOCK_NAME).exists()
    task = Counting([1.0, math.inf])
    with pytest.raises(
        TrainingDiverged,
        match=r"loss is not finite at step 2: loss=inf. No checkpoint was written yet; "
        r"try something else",
    ):
        RunLoop(task, tmp_path / "bad", progress=False).run()
    assert task.done == 1 and not (tmp_path / "bad" / LOCK_NAME).exists()


class OtherProcessStops(Distributed):
    """Rank 0 of two processes, the other one simulated: it contributes the same numbers to every sum, and
    from its ``after``-th sum on it asks to stop (the last number of a sum is the stop request)."""

    def __init__(self, after: int):
        super().__init__(rank=0, world_size=2)
        self.after, self.sums = after, 0

    def sum(self, values):
        self.sums += 1
        other = [*values[:-1], float(self.sums >= self.after)]
        return [mine + theirs for mine, theirs in zip(values, other)]

    def on_main(self, action):  # (no process group to broadcast an error over)
        action()


class Agreeing(Counting):
    """A task that sums its loss over the processes every step and folds the stop request into that sum."""

    loop: RunLoop
    world: Distributed

    def step(self, batch):
        totals = self.world.sum([self.losses[batch], self.loop.asked()])
        self.loop.agree(totals.pop())
        return {"loss": totals[0] / self.world.world_size}


@pytest.mark.parametrize("task_class", [Counting, Agreeing])
def test_processes_agree_on_a_stop_in_the_tasks_own_sum_or_the_loops(tmp_path, task_class):
    """Several processes stop after the same step, one small all-reduce per step: the task's own, when it
    hands the loop the agreed stop request, else the loop's."""
    world, task = OtherProcessStops(after=2), task_class([1.0] * 5)
    loop = RunLoop(task, tmp_path, world=world, progress=False)
    task.loop, task.world = loop, world
    with pytest.raises(TrainingInterrupted, match=r"SIGINT at step 2: the steps done are saved"):
        loop.run()
    assert task.done == 2 and world.sums == 2
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == 2 and not (tmp_path / LOCK_NAME).exists()

"""``adn reproduce``: the paper's claims at a scale a CPU can run, as one resumable command.

Every arm is an ordinary ``adn train`` run followed by ``adn eval`` (the same code paths users run; the
command line passes its own entry point in, so they run in-process without this module importing the
command line, and a caller without one runs them as ``python -m adn`` subprocesses); the protocol below is
the single place where the settings live. A finished run leaves ``result.json`` next to its checkpoint and
is skipped on re-run, unless its command changed.

Arms (same data, model, recipe and epochs; several seeds each):

==================  =================================================  ==========================
arm                 what                                               used by
==================  =================================================  ==========================
adn                 Algorithm 1 with skip-aware norms (the method)     Table 1, 3, Fig. 3a/3b/4
adn-no-san          specialization, but one norm for both depths       Table 3
joint               both depths trained on labels, skip-aware norms    Table 3, Fig. 3b contrast
joint-no-san        neither                                            Table 3
individual-super    a plain network of the super-net's depth           Table 1, 3, Fig. 4
individual-base     a plain network of the base-net's depth            Table 1, 3
adn-pooled          Algorithm 1 with pooled feature distillation       feature-KD comparison
==================  =================================================  ==========================
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..utils import jsonout
from ..utils.atomic import atomic_write
from .reproduce_report import verdict, write_report  # noqa: F401  (verdict: part of this module's API)

ARMS: dict[str, list[str]] = {
    "adn": ["--method", "adn"],
    "adn-no-san": ["--method", "adn", "--no-skip-aware-norm"],
    # (the records predate adn train storing per-depth statistics after joint training: their "accuracy" is
    # the running statistics', as --no-depth-statistics gives; the key stays, so that they stay valid)
    "joint": ["--method", "joint"],
    "joint-no-san": ["--method", "joint", "--no-skip-aware-norm"],
    "individual-super": ["--method", "individual", "--skip", "super"],
    "individual-base": ["--method", "individual", "--skip", "base"],
    "adn-pooled": ["--method", "adn", "--feature-kd", "pooled"],
}

# The demo's schedule (``make demo``: all 60,000 training images, 10 epochs, cosine decay, test set), with the
# recipes a user picks between: which one ``adn train`` runs without ``--method`` is decided here (issue 27).
DEMO_ARMS: dict[str, list[str]] = {
    "individual-super": ARMS["individual-super"],
    "individual-base": ARMS["individual-base"],
    "adn": ["--method", "adn", "--base-ce", "0"],
    "adn-base-ce0.5": ["--method", "adn", "--base-ce", "0.5"],
    # --no-depth-statistics: the record keeps both numbers, the running statistics' ("accuracy") and the
    # per-depth ones ("accuracy_recalibrated": the same measurement adn train stores by default at the end)
    "joint": ["--method", "joint", "--no-depth-statistics"],
}


@dataclass
class Protocol:
    """The settings every arm shares: the converged protocol by default (all Fashion-MNIST training images,
    5,000 of them held out for validation, final numbers on the 10,000 test images); :meth:`quick` is the
    harness check the test suite runs. The recipe (lr, weight decay, batch, epochs, schedule) was chosen
    once for the individual baseline on the held-out split (docs/reproduction.md, "Recipe")."""

    model: str = "resnet20"
    width: int = 8
    data: str = "fashion-mnist"
    data_path: str | None = None  # default: the Debian package or torchvision's download
    val_from_train: int | None = 5000  # monitoring and recipe choice; never the test set
    train_subset: int | None = None
    final_val_subset: int | None = None  # None: the whole test set
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    # He et al. (2016)'s ResNet schedule, which the paper follows: lr / 10 at 50% and 75% of training. Its
    # last phase at lr 0.001 is where a plateau can show; a cosine schedule still gains 0.7 points in its
    # last 20% at 20 and 30 epochs alike (docs/reproduction/notes.md).
    lr_steps: tuple[int, ...] = (15, 23)
    lr_scheduler: str = "multisteplr"  # with lr_steps; any other adn train --lr-scheduler ignores them
    weight_decay: float = 5e-4
    seeds: tuple[int, ...] = (0, 1, 2)
    max_steps_per_epoch: int | None = None
    recalibrate_bn: int = 50  # batches of 256 training images per sub-network; 0: off
    device: str | None = None  # None: adn train's default (a GPU if there is one)
    extra: list[str] = field(default_factory=list)
    arms: dict[str, list[str]] = field(default_factory=lambda: dict(ARMS))

    @classmethod
    def quick(cls) -> "Protocol":
        return cls(
            train_subset=128,
            val_from_train=64,
            final_val_subset=128,
            epochs=2,
            lr_steps=(1,),
            batch_size=32,
            seeds=(0, 1),
            max_steps_per_epoch=2,
            recalibrate_bn=2,
        )

    @classmethod
    def demo(cls) -> "Protocol":
        """``make demo``'s schedule: every training image (no held-out split), 10 epochs, cosine decay, the
        test set; the arms are the recipes a user chooses between (:data:`DEMO_ARMS`).

        The precision is pinned (bfloat16 autocast, channels-last: what ``adn train`` picks by itself on a CPU
        with native bfloat16) so that seeds trained on different machines compare: left automatic, a CPU
        without native bfloat16 trains in float32, and the cache key (the command line) would not show it."""
        return cls(
            val_from_train=None,
            epochs=10,
            lr_scheduler="cosineannealinglr",
            lr_steps=(),
            arms=dict(DEMO_ARMS),
            extra=["--amp", "--channels-last"],
        )

    def train_args(self, arm: str, seed: int, output_dir: Path) -> list[str]:
        # (the order of the flags is part of each run's cache key: keep it)
        schedule = ["--lr-scheduler", self.lr_scheduler]
        if self.lr_scheduler == "multisteplr":
            schedule += ["--lr-steps", *map(str, self.lr_steps)]
        held_out = ["--val-from-train", str(self.val_from_train)] if self.val_from_train else []
        args = [
            "train",
            "--model",
            self.model,
            "--width",
            str(self.width),
            "--data",
            self.data,
            "--epochs",
            str(self.epochs),
            "-b",
            str(self.batch_size),
            "--lr",
            str(self.lr),
            *schedule,
            "--wd",
            str(self.weight_decay),
            *held_out,
            "--seed",
            str(seed),
            "--output-dir",
            str(output_dir),
            "--no-progress",
        ]
        return args + self.data_and_device_args() + self.arms[arm] + list(self.extra)

    def data_and_device_args(self) -> list[str]:
        """The `adn train` flags of the protocol's data and device settings that are given only when set."""
        args = []
        if self.data_path:
            args += ["--data-path", str(self.data_path)]
        if self.train_subset:
            args += ["--train-subset", str(self.train_subset)]
        if self.max_steps_per_epoch:
            args += ["--max-steps-per-epoch", str(self.max_steps_per_epoch)]
        if self.device:
            args += ["--device", self.device]
        return args

    def eval_args(self, arm: str, checkpoint: Path, recalibrate: bool = False) -> list[str]:
        skip = "all" if not arm.startswith("individual") else self.arms[arm][-1]
        args = ["eval", "--checkpoint", str(checkpoint), "--skip", skip, "--json", "--no-latency", "--no-plot"]
        if self.final_val_subset:
            args += ["--val-subset", str(self.final_val_subset)]
        if self.device:
            args += ["--device", self.device]
        if recalibrate:
            args += ["--recalibrate-bn", str(self.recalibrate_bn)]
        return args

    def commands(self, arm: str, seed: int, folder: Path) -> list[list[str]]:
        """The train command, the eval command, and the recalibrated eval command if any."""
        checkpoint = folder / "checkpoint.pt"
        commands = [self.train_args(arm, seed, folder), self.eval_args(arm, checkpoint)]
        if self.recalibrate_bn:
            commands.append(self.eval_args(arm, checkpoint, recalibrate=True))
        return commands


def command_line(args: list[str]) -> str:
    return "adn " + shlex.join(args)


# Runs ``adn ARGS`` and returns its exit status, printing its results on stdout (``adn.cli.main``).
CommandRunner = Callable[[list[str]], int]


def run_adn(args: list[str], run_command: CommandRunner | None = None) -> str:
    """Run an ``adn`` command and return what it printed on stdout: in this process with ``run_command``,
    else in a ``python -m adn`` subprocess (its log lines pass through to stderr)."""
    if run_command is None:
        done = subprocess.run([sys.executable, "-m", "adn", *args], stdout=subprocess.PIPE, text=True)
        code, printed = done.returncode, done.stdout
    else:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = run_command(args)
        printed = out.getvalue()
    if code != 0:
        raise RuntimeError(f"`{command_line(args)}` failed with exit code {code}")
    return printed


def cache_key(protocol: Protocol, arm: str, seed: int) -> list[str]:
    # The key leaves out where the runs live, so a moved results folder stays valid.
    return [command_line(c) for c in protocol.commands(arm, seed, Path("RUNS") / arm / f"seed{seed}")]


def cached_result(protocol: Protocol, arm: str, seed: int, folders: list[Path]) -> dict | None:
    """The first ``result.json`` among ``folders`` made by the current commands of (arm, seed)."""
    return first_record(cache_key(protocol, arm, seed), [folder / arm / f"seed{seed}" for folder in folders])


def first_record(key: list[str], folders: list[Path]) -> dict | None:
    """The first readable ``result.json`` among ``folders`` whose commands are ``key``."""
    for folder in folders:
        path = folder / "result.json"
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                cached = json.loads(path.read_text())
                if cached.get("key") == key:
                    return cached
    return None


def write_json(path: Path, value) -> None:
    """Write ``value`` as JSON (never NaN), atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(jsonout.dumps(value, indent=1)))


# Written when a run starts, removed when its result is: a run stopped in between (a session's end, a
# reboot, Ctrl-C) continues from its last checkpoint with `adn train --resume` instead of starting again.
PENDING = "pending.json"


def interrupted_checkpoint(folder: Path, key: list[str]) -> Path | None:
    """The checkpoint of an interrupted run of exactly these commands in ``folder``, if there is one."""
    checkpoint = folder / "checkpoint.pt"
    try:
        pending = json.loads((folder / PENDING).read_text())
    except (OSError, ValueError):
        return None
    return checkpoint if pending.get("key") == key and checkpoint.is_file() else None


def _read_log(path: Path) -> list[dict]:
    rows = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def training_cpu_seconds(log_path: Path) -> float | None:
    """CPU seconds the training of a run took, summed over its epochs (``epoch_cpu_s`` in ``log.jsonl``);
    None when an epoch did not record it (logs written before it was measured). Unlike wall time, it
    does not count time the run spent paused or waiting for a core."""
    rows = _read_log(log_path)
    if not rows or any("epoch_cpu_s" not in row for row in rows):
        return None
    return sum(row["epoch_cpu_s"] for row in rows)


def run_arm(
    protocol: Protocol,
    arm: str,
    seed: int,
    root: Path,
    record: Path | None = None,
    log=print,
    run_command: CommandRunner | None = None,
) -> dict:
    """Train and evaluate one (arm, seed), or return its cached result. ``result.json`` holds the
    commands, per-sub-network accuracy (with the networks' own and with recalibrated batch-norm
    statistics), MACs, params, the skip-aware norm distances, and wall time. ``record`` (a folder kept
    in version control) receives a copy of ``result.json`` and ``log.jsonl``: enough to rebuild the
    report and to skip the run on another machine, where the checkpoints are gone."""
    folder = root / arm / f"seed{seed}"
    record = record or root
    cached = cached_result(protocol, arm, seed, [record, root])
    if cached is not None:
        saved = record / arm / f"seed{seed}"
        if not (saved / "result.json").is_file():
            save_record(folder, saved, cached)
        return cached
    key = cache_key(protocol, arm, seed)
    resume = interrupted_checkpoint(folder, key)
    if resume is None and folder.exists():  # a run of other commands, or one that never saved: start afresh
        for name in ("checkpoint.pt", "log.jsonl", PENDING):
            (folder / name).unlink(missing_ok=True)
    commands = protocol.commands(arm, seed, folder)
    write_json(folder / PENDING, {"key": key})
    train = commands[0] + (["--resume", str(resume)] if resume else [])
    log(f"{arm} seed {seed}: {command_line(train)}")
    started = time.perf_counter()
    run_adn(train, run_command)
    train_s = time.perf_counter() - started
    if resume:  # the time of the epochs before the interruption too
        train_s = sum(row.get("epoch_time_s", 0.0) for row in _read_log(folder / "log.jsonl"))
    # timed on its own: after a resume, train_s is no longer the time since `started`
    eval_started = time.perf_counter()
    rows = json.loads(run_adn(commands[1], run_command))
    recalibrated = json.loads(run_adn(commands[2], run_command)) if len(commands) > 2 else []
    result = {
        "arm": arm,
        "seed": seed,
        "key": key,
        "resumed": resume is not None,
        "commands": [command_line(c) for c in commands],
        "train_s": train_s,
        "train_cpu_s": training_cpu_seconds(folder / "log.jsonl"),
        "eval_s": time.perf_counter() - eval_started,
        "accuracy": {row["skip"]: row["acc1"] for row in rows},
        "accuracy_recalibrated": {row["skip"]: row["acc1"] for row in recalibrated},
        "macs": {row["skip"]: row["macs"] for row in rows},
        "params": {row["skip"]: row["params"] for row in rows},
    }
    result.update(_checkpoint_facts(folder / "checkpoint.pt"))
    write_json(folder / "result.json", result)
    (folder / PENDING).unlink(missing_ok=True)
    save_record(folder, record / arm / f"seed{seed}", result)
    log(
        f"{arm} seed {seed}: done in {train_s + result['eval_s']:.0f}s; "
        + ", ".join(f"{k}={v:.2f}%" for k, v in result["accuracy"].items())
    )
    return result


def _checkpoint_facts(checkpoint: Path) -> dict:
    """What the report needs from a checkpoint, so that it can be rebuilt without it: the skip-aware norm
    distances (Fig. 3b) and the precision the run trained in."""
    from ..vision.analyze import AnalysisError, norm_distances
    from ..vision.checkpoint import load_network

    net, ckpt = load_network(checkpoint)
    try:
        distances = norm_distances(net)
    except AnalysisError:  # trained without skip-aware norms
        distances = None
    return {"norm_distance": distances, "speed": ckpt["meta"].get("speed")}


def save_record(folder: Path, saved: Path, result: dict) -> None:
    """Copy a finished run's ``result.json`` and ``log.jsonl`` from ``folder`` to ``saved`` (kept in version control)."""
    if saved.resolve() == folder.resolve():
        return
    write_json(saved / "result.json", result)
    log_file = folder / "log.jsonl"
    if log_file.is_file():
        atomic_write(saved / "log.jsonl", lambda tmp: Path(tmp).write_text(log_file.read_text()))


def _one_thread() -> None:
    torch.set_num_threads(1)


def _run_arm_job(
    protocol: Protocol, arm: str, seed: int, root: Path, record: Path, run_command: CommandRunner | None
) -> dict:
    return run_arm(
        protocol, arm, seed, root, record, log=lambda m: print(m, file=sys.stderr, flush=True), run_command=run_command
    )


def run_all(
    protocol: Protocol,
    root: Path,
    record: Path | None = None,
    arms=None,
    jobs: int = 1,
    log=print,
    run_command: CommandRunner | None = None,
) -> dict[str, list[dict]]:
    """Every (arm, seed), seeds outermost: an interrupted run has all arms at the first seeds. ``jobs``
    runs train at once, each in its own process with one thread (on 2 cores, two one-thread runs train
    1.7x faster than one two-thread run: this small network does not keep two threads busy)."""
    arms = list(arms or protocol.arms)
    tasks = [(arm, seed) for seed in protocol.seeds for arm in arms]
    if jobs <= 1:
        done = {task: run_arm(protocol, *task, root, record, log, run_command) for task in tasks}
    else:
        import concurrent.futures
        import multiprocessing

        os.environ["OMP_NUM_THREADS"] = "1"  # read by torch when the spawned workers import it
        with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread
        ) as pool:
            futures = {
                task: pool.submit(_run_arm_job, protocol, *task, root, record or root, run_command) for task in tasks
            }
            done = {task: future.result() for task, future in futures.items()}
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for (arm, _seed), result in done.items():
        results[arm].append(result)
    return results


def collect_results(protocol: Protocol, root: Path, record: Path | None = None, arms=None) -> dict[str, list[dict]]:
    """The finished runs of the current protocol (from ``record`` or ``root``), without training any."""
    results: dict[str, list[dict]] = {}
    for arm in arms or protocol.arms:
        results[arm] = [
            r
            for seed in protocol.seeds
            if (r := cached_result(protocol, arm, seed, [record or root, root])) is not None
        ]
    return results


def reproduce(
    protocol: Protocol,
    root: Path,
    docs: Path,
    record: Path | None = None,
    figures: Path | None = None,
    quick: bool = False,
    train_only: bool = False,
    report_only: bool = False,
    jobs: int = 1,
    arms=None,
    log=print,
    run_command: CommandRunner | None = None,
    report=write_report,
) -> Path | None:
    """The whole reproduction: train (or reuse) every arm, then write the report. ``record``: where each
    finished run's ``result.json`` and ``log.jsonl`` are kept (default: ``runs/`` beside the figures, in
    version control). ``report_only``: write the report from the finished runs, train nothing. ``report``:
    the report writer (the paper's, or :func:`~adn.studies.demo_report.write_demo_report`)."""
    figures = figures or docs.parent / docs.stem
    record = record or figures / "runs"
    if report_only:
        results = collect_results(protocol, root, record)
    else:
        results = run_all(protocol, root, record, arms=arms, jobs=jobs, log=log, run_command=run_command)
    if train_only:
        return None
    return report(protocol, results, docs, figures, root, record, quick=quick)

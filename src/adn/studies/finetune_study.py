"""``adn reproduce-finetune``: can a trained network be *fine-tuned* into an adaptive depth network for a
fraction of the cost of training one from scratch? (issue 13)

The study takes the individual super-depth networks of the reproduction (``adn reproduce``'s arm
``individual-super``, trained to convergence with :class:`adn.reproduce.Protocol`), converts each with
``adn train --init-from`` and fine-tunes it with Algorithm 1 for 10%, 20% and 30% of the from-scratch
epochs, with the same seeds. Every sub-network is then evaluated as the reproduction evaluates its arms,
and the report (docs/reproduction/finetune.md, written by :mod:`adn.finetune_report`) compares them with the
individual networks and with ADN trained from scratch (the reproduction's arms ``individual-base`` and
``adn``), and gives the cost as a fraction of from-scratch ADN training.

Like ``adn reproduce``, every run is an ordinary ``adn train`` + ``adn eval`` and is cached: a finished
run leaves ``result.json`` (commands, accuracies, times) beside its checkpoint and a copy with its
``log.jsonl`` in a record folder kept in version control; a run whose commands have not changed is not
trained again, on this machine or another.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .reproduce import (
    CommandRunner,
    Protocol,
    cache_key,
    cached_result,
    collect_results,
    command_line,
    first_record,
    run_adn,
    run_arm,
    save_record,
    training_cpu_seconds,
    write_json,
)

TEACHER = "individual-super"  # the reproduction's arm whose checkpoints are fine-tuned
BASELINES = ("individual-super", "individual-base", "adn")  # the reproduction's arms the report compares with
FRACTIONS = (0.1, 0.2, 0.3)  # of the from-scratch epochs
# How the converted network is trained, by name (``adn reproduce-finetune --methods``): the paper's Algorithm 1
# (the first study's only method, whose runs keep their arm names), Algorithm 1 with the base-net's label loss,
# and joint training, whose per-depth statistics the report reads from the recalibrated evaluation (the same
# measurement ``adn train`` stores by default).
METHODS: dict[str, list[str]] = {
    "adn": ["--method", "adn"],
    "adn-base-ce0.5": ["--method", "adn", "--base-ce", "0.5"],
    "joint": ["--method", "joint", "--no-depth-statistics"],
}


@dataclass
class FinetuneRecipe:
    """How the converted network is fine-tuned. The converged teacher ends at lr 0.001 (the protocol's
    0.1 divided by 10 twice); restarting at the from-scratch rate would undo what it learned, so the
    fine-tuning starts at a tenth of it and decays to zero with a cosine schedule over its few epochs.
    The head keeps its class count (same data set): no separate head learning rate is needed."""

    fractions: tuple[float, ...] = FRACTIONS
    methods: tuple[str, ...] = ("adn",)  # keys of METHODS
    lr: float = 0.01
    lr_scheduler: str = "cosineannealinglr"
    lr_warmup_epochs: int = 0
    body_lr_scale: float = 1.0
    # images of the training set the fine-tuning leaves out to monitor itself (None: the protocol's own split).
    # The demo protocol's teachers trained on every image, so there it is a split the fine-tuning never saw,
    # not one the teacher never saw.
    val_from_train: int | None = None

    def epochs(self, protocol: Protocol, fraction: float) -> int:
        return max(1, round(fraction * protocol.epochs))

    def held_out(self, protocol: Protocol) -> int | None:
        return self.val_from_train or protocol.val_from_train

    def arms(self) -> list[tuple[float, str, str]]:
        """``(fraction, method, arm name)`` of every fine-tuning arm, methods innermost."""
        return [(f, m, arm_name(f, m)) for f in self.fractions for m in self.methods]


def arm_name(fraction: float, method: str = "adn") -> str:
    """``finetune-20`` for 20% of the from-scratch epochs with Algorithm 1, ``finetune-20-joint`` with
    another method."""
    return f"finetune-{round(fraction * 100)}" + ("" if method == "adn" else f"-{method}")


def train_args(
    protocol: Protocol,
    recipe: FinetuneRecipe,
    fraction: float,
    seed: int,
    folder: Path,
    teacher: Path,
    method: str = "adn",
) -> list[str]:
    """``adn train`` from the teacher's checkpoint: the protocol's model, data and batch; the recipe's
    schedule; the method (:data:`METHODS`)."""
    held_out = recipe.held_out(protocol)
    args = [
        "train",
        "--model",
        protocol.model,
        "--width",
        str(protocol.width),
        "--data",
        protocol.data,
        "--init-from",
        str(teacher),
        *METHODS[method],
        "--epochs",
        str(recipe.epochs(protocol, fraction)),
        "-b",
        str(protocol.batch_size),
        "--lr",
        str(recipe.lr),
        "--lr-scheduler",
        recipe.lr_scheduler,
        "--wd",
        str(protocol.weight_decay),
        *(["--val-from-train", str(held_out)] if held_out else []),
        "--seed",
        str(seed),
        "--output-dir",
        str(folder),
        "--no-progress",
    ]
    if recipe.lr_warmup_epochs:
        args += ["--lr-warmup-epochs", str(recipe.lr_warmup_epochs)]
    if recipe.body_lr_scale != 1.0:
        args += ["--body-lr-scale", str(recipe.body_lr_scale)]
    return args + protocol.data_and_device_args() + list(protocol.extra)


def commands(
    protocol: Protocol,
    recipe: FinetuneRecipe,
    fraction: float,
    seed: int,
    folder: Path,
    teacher: Path,
    method: str = "adn",
) -> list[list[str]]:
    """The train command, then the reproduction's eval commands (every sub-network; recalibrated too)."""
    checkpoint = folder / "checkpoint.pt"
    arm = arm_name(fraction, method)
    evals = [protocol.eval_args(arm, checkpoint)]
    if protocol.recalibrate_bn:
        evals.append(protocol.eval_args(arm, checkpoint, recalibrate=True))
    return [train_args(protocol, recipe, fraction, seed, folder, teacher, method), *evals]


def finetune_key(
    protocol: Protocol, recipe: FinetuneRecipe, fraction: float, seed: int, method: str = "adn"
) -> list[str]:
    """What a cached result must have been made by: the teacher's commands and the fine-tuning's, with the
    folders left out (a moved results folder stays valid)."""
    arm = arm_name(fraction, method)
    own = commands(protocol, recipe, fraction, seed, Path("RUNS") / arm / f"seed{seed}", Path("TEACHER"), method)
    return [*cache_key(protocol, TEACHER, seed), *map(command_line, own)]


def cached_finetune(
    protocol: Protocol, recipe: FinetuneRecipe, fraction: float, seed: int, folders: list[Path], method: str = "adn"
) -> dict | None:
    return first_record(
        finetune_key(protocol, recipe, fraction, seed, method),
        [folder / arm_name(fraction, method) / f"seed{seed}" for folder in folders],
    )


# ----- the teachers ------------------------------------------------------------------------------------------
@dataclass
class Reproduction:
    """Where ``adn reproduce`` keeps its runs: checkpoints in ``root``, results in ``record``."""

    root: Path = Path("runs/reproduce")
    record: Path = Path("results/reproduction/runs")


def teacher_checkpoint(
    protocol: Protocol,
    seed: int,
    reproduction: Reproduction,
    train_missing: bool = False,
    log=print,
    run_command: CommandRunner | None = None,
) -> Path | None:
    """The checkpoint of the reproduction's individual super-net of ``seed``, or None while it does not
    exist. ``train_missing``: train it first, as ``adn reproduce --train-only --arms individual-super``
    would (same folders, same cache; not while ``adn reproduce`` is training it)."""
    checkpoint = reproduction.root / TEACHER / f"seed{seed}" / "checkpoint.pt"
    finished = cached_result(protocol, TEACHER, seed, [reproduction.root, reproduction.record]) is not None
    if checkpoint.is_file() and finished:
        return checkpoint
    if not train_missing:
        return None
    if finished:  # recorded on another machine: the checkpoint itself is not here
        raise FileNotFoundError(
            f"{TEACHER} seed {seed} has finished (its result is recorded) but its checkpoint "
            f"{checkpoint} is not on this machine; copy it here, or delete its result.json in "
            f"{reproduction.record} to train it again"
        )
    run_arm(protocol, TEACHER, seed, reproduction.root, reproduction.record, log=log, run_command=run_command)
    return checkpoint


# ----- one fine-tuning run -------------------------------------------------------------------------------------
def run_finetune(
    protocol: Protocol,
    recipe: FinetuneRecipe,
    fraction: float,
    seed: int,
    teacher: Path,
    root: Path,
    record: Path,
    log=print,
    run_command: CommandRunner | None = None,
    method: str = "adn",
) -> dict:
    """Fine-tune the teacher of ``seed`` for ``fraction`` of the epochs with ``method`` and evaluate every
    sub-network, or return the cached result. The result has the reproduction's fields (``accuracy``,
    ``accuracy_recalibrated``, ``macs``, ``params``, ``train_s``, ``eval_s``), ``epochs``, ``method`` and
    ``held_out`` (the fine-tuning's last held-out accuracies, when it had a held-out split)."""
    arm = arm_name(fraction, method)
    folder = root / arm / f"seed{seed}"
    cached = cached_finetune(protocol, recipe, fraction, seed, [record, root], method)
    if cached is not None:
        if not (record / arm / f"seed{seed}" / "result.json").is_file():
            save_record(folder, record / arm / f"seed{seed}", cached)
        return cached
    for name in ("checkpoint.pt", "log.jsonl"):  # a run that died before its result was written: start afresh
        (folder / name).unlink(missing_ok=True)
    steps = commands(protocol, recipe, fraction, seed, folder, teacher, method)
    log(f"{arm} seed {seed}: {command_line(steps[0])}")
    started = time.perf_counter()
    run_adn(steps[0], run_command)
    train_s = time.perf_counter() - started
    rows = json.loads(run_adn(steps[1], run_command))
    recalibrated = json.loads(run_adn(steps[2], run_command)) if len(steps) > 2 else []
    result = {
        "arm": arm,
        "seed": seed,
        "fraction": fraction,
        "method": method,
        "epochs": recipe.epochs(protocol, fraction),
        "key": finetune_key(protocol, recipe, fraction, seed, method),
        "teacher": str(teacher),
        "commands": [command_line(c) for c in steps],
        "train_s": train_s,
        "train_cpu_s": training_cpu_seconds(folder / "log.jsonl"),
        "eval_s": time.perf_counter() - started - train_s,
        "accuracy": {row["skip"]: row["acc1"] for row in rows},
        "accuracy_recalibrated": {row["skip"]: row["acc1"] for row in recalibrated},
        "macs": {row["skip"]: row["macs"] for row in rows},
        "params": {row["skip"]: row["params"] for row in rows},
        "held_out": last_held_out(folder / "log.jsonl"),
    }
    write_json(folder / "result.json", result)
    save_record(folder, record / arm / f"seed{seed}", result)
    log(
        f"{arm} seed {seed}: done in {train_s + result['eval_s']:.0f}s; "
        + ", ".join(f"{k}={v:.2f}%" for k, v in result["accuracy"].items())
    )
    return result


def last_held_out(log_path: Path) -> dict[str, float]:
    """The last epoch's held-out accuracies of the log (``val_acc1_super``, ``val_acc1_base`` and their
    ``_recal`` forms), the numbers a method is screened on before the test set; {} without a held-out split."""
    rows = (
        [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.is_file() else []
    )
    epochs = [row for row in rows if "epoch" in row]
    if not epochs:
        return {}
    return {k: v for k, v in epochs[-1].items() if k.startswith("val_acc1_")}


# ----- the whole study -----------------------------------------------------------------------------------------
@dataclass
class Study:
    protocol: Protocol
    recipe: FinetuneRecipe
    root: Path  # fine-tuning checkpoints
    record: Path  # fine-tuning results, kept in version control
    reproduction: Reproduction


def collect(study: Study) -> dict[str, list[dict]]:
    """Every finished run the report uses: the reproduction's baselines and the fine-tuning arms."""
    results = collect_results(study.protocol, study.reproduction.root, study.reproduction.record, arms=BASELINES)
    folders = [study.record, study.root]
    for fraction, method, arm in study.recipe.arms():
        results[arm] = [
            r
            for seed in study.protocol.seeds
            if (r := cached_finetune(study.protocol, study.recipe, fraction, seed, folders, method))
        ]
    return results


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _job(
    study: Study, fraction: float, method: str, seed: int, teacher: Path, run_command: CommandRunner | None
) -> dict:
    return run_finetune(
        study.protocol,
        study.recipe,
        fraction,
        seed,
        teacher,
        study.root,
        study.record,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        run_command=run_command,
        method=method,
    )


def run_study(
    study: Study, train_teachers: bool = False, jobs: int = 1, log=print, run_command: CommandRunner | None = None
) -> list[str]:
    """Fine-tune (or reuse) every (fraction, seed) whose teacher exists; returns what is still missing.
    ``jobs`` runs train at once, one thread each (as ``adn reproduce --jobs``)."""
    missing, tasks = [], []
    for seed in study.protocol.seeds:
        teacher = teacher_checkpoint(study.protocol, seed, study.reproduction, train_teachers, log, run_command)
        if teacher is None:
            missing.append(
                f"{TEACHER} seed {seed} (`adn reproduce --train-only --arms {TEACHER} --seeds {seed}`, "
                f"or `adn reproduce-finetune --train-teachers`)"
            )
            continue
        tasks += [(fraction, method, seed, teacher) for fraction, method, _ in study.recipe.arms()]
    if jobs <= 1:
        for fraction, method, seed, teacher in tasks:
            run_finetune(
                study.protocol,
                study.recipe,
                fraction,
                seed,
                teacher,
                study.root,
                study.record,
                log,
                run_command,
                method,
            )
    else:
        import concurrent.futures
        import multiprocessing

        os.environ["OMP_NUM_THREADS"] = "1"  # read by torch when the spawned workers import it
        with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread
        ) as pool:
            for future in [pool.submit(_job, study, *task, run_command) for task in tasks]:
                future.result()
    return missing

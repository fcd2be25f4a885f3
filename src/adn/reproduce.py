"""``adn reproduce``: the paper's claims at a scale a CPU can run, as one resumable command.

Every arm is an ordinary ``adn train`` run followed by ``adn eval`` (the same code paths users run,
called in-process); the protocol below is the single place where the settings live. A finished run
leaves ``result.json`` next to its checkpoint and is skipped on re-run, unless its command changed.

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
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_write

ARMS: dict[str, list[str]] = {
    "adn": ["--method", "adn"],
    "adn-no-san": ["--method", "adn", "--no-skip-aware-norm"],
    "joint": ["--method", "joint"],
    "joint-no-san": ["--method", "joint", "--no-skip-aware-norm"],
    "individual-super": ["--method", "individual", "--skip", "super"],
    "individual-base": ["--method", "individual", "--skip", "base"],
    "adn-pooled": ["--method", "adn", "--feature-kd", "pooled"],
}


@dataclass
class Protocol:
    """The settings every arm shares. The defaults are the full run (about 75-90 min on 2 CPU cores);
    :meth:`quick` is the harness check the test suite runs."""
    model: str = "resnet20"
    width: int = 8
    data: str = "fashion-mnist"
    train_subset: int | None = 20000
    val_subset_during_training: int = 2000   # per-epoch monitoring only; final numbers use the whole test set
    final_val_subset: int | None = None
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    seeds: tuple[int, ...] = (0, 1, 2)
    max_steps_per_epoch: int | None = None
    extra: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls) -> "Protocol":
        return cls(train_subset=128, val_subset_during_training=64, final_val_subset=128, epochs=1,
                   batch_size=32, seeds=(0, 1), max_steps_per_epoch=2)

    def train_args(self, arm: str, seed: int, output_dir: Path) -> list[str]:
        args = ["train", "--model", self.model, "--width", str(self.width), "--data", self.data,
                "--epochs", str(self.epochs), "-b", str(self.batch_size), "--lr", str(self.lr),
                "--val-subset", str(self.val_subset_during_training), "--seed", str(seed),
                "--output-dir", str(output_dir), "--no-progress"]
        if self.train_subset:
            args += ["--train-subset", str(self.train_subset)]
        if self.max_steps_per_epoch:
            args += ["--max-steps-per-epoch", str(self.max_steps_per_epoch)]
        return args + ARMS[arm] + list(self.extra)

    def eval_args(self, arm: str, checkpoint: Path) -> list[str]:
        skip = "all" if not arm.startswith("individual") else ARMS[arm][-1]
        args = ["eval", "--checkpoint", str(checkpoint), "--skip", skip, "--json", "--no-latency", "--no-plot"]
        if self.final_val_subset:
            args += ["--val-subset", str(self.final_val_subset)]
        return args


def command_line(args: list[str]) -> str:
    return "adn " + shlex.join(args)


def _run_cli(args: list[str]) -> str:
    """Run an ``adn`` command in this process and return what it printed on stdout."""
    from .cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    if code != 0:
        raise RuntimeError(f"`{command_line(args)}` failed with exit code {code}")
    return out.getvalue()


def run_arm(protocol: Protocol, arm: str, seed: int, root: Path, log=print) -> dict:
    """Train and evaluate one (arm, seed), or return its cached result. ``result.json`` holds the
    commands, per-sub-network accuracy, and wall time."""
    folder = root / arm / f"seed{seed}"
    train_args = protocol.train_args(arm, seed, folder)
    eval_args = protocol.eval_args(arm, folder / "checkpoint.pt")
    result_file = folder / "result.json"
    commands = [command_line(train_args), command_line(eval_args)]
    # The cache key leaves out where the runs live, so a moved results folder stays valid.
    placeholder = Path("RUNS") / arm / f"seed{seed}"
    key = [command_line(protocol.train_args(arm, seed, placeholder)),
           command_line(protocol.eval_args(arm, placeholder / "checkpoint.pt"))]
    if result_file.is_file():
        cached = json.loads(result_file.read_text())
        if cached.get("key") == key:
            return cached
        log(f"{arm} seed {seed}: settings changed since the cached run; training again")
    if folder.exists():  # a run that died before its result was written: start it afresh
        for name in ("checkpoint.pt", "log.jsonl"):
            (folder / name).unlink(missing_ok=True)
    log(f"{arm} seed {seed}: {commands[0]}")
    started = time.perf_counter()
    _run_cli(train_args)
    train_s = time.perf_counter() - started
    rows = json.loads(_run_cli(eval_args))
    result = {"arm": arm, "seed": seed, "key": key, "commands": commands, "train_s": train_s,
              "eval_s": time.perf_counter() - started - train_s,
              "accuracy": {row["skip"]: row["acc1"] for row in rows},
              "macs": {row["skip"]: row["macs"] for row in rows},
              "params": {row["skip"]: row["params"] for row in rows}}
    atomic_write(result_file, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    log(f"{arm} seed {seed}: done in {train_s + result['eval_s']:.0f}s; "
        + ", ".join(f"{k}={v:.2f}%" for k, v in result["accuracy"].items()))
    return result


def run_all(protocol: Protocol, root: Path, arms=None, log=print) -> dict[str, list[dict]]:
    """Every (arm, seed), seeds outermost: an interrupted run has all arms at the first seeds."""
    arms = list(arms or ARMS)
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in protocol.seeds:
        for arm in arms:
            results[arm].append(run_arm(protocol, arm, seed, root, log))
    return results


# ----- statistics --------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(a: list[float], b: list[float]) -> str:
    """Whether mean(a) > mean(b) is resolved at this number of seeds: "holds" when the difference of
    means exceeds the sum of the two standard deviations, "fails" when it is that far the other way,
    else "within noise"."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if ma - mb > sa + sb:
        return "holds"
    if mb - ma > sa + sb:
        return "fails"
    return "within noise"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {sys.version.split()[0]}")

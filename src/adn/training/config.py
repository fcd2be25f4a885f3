"""The settings every training run has (:class:`RunConfig`), and one way to check settings (:func:`need`).

``adn train`` (:class:`adn.vision.train_config.TrainConfig`), ``adn detect train``
(:class:`adn.detection.config.DetectTrainConfig`) and ``adn train-lm`` (:class:`adn.lm.config.LMTrainConfig`)
extend it; each redeclares the defaults that differ (output folder, learning rate, batch size). Their
``validate()`` calls this one first, and every failed check is a ``ValueError`` naming the flag.

``keep_checkpoints`` is the number of numbered checkpoints kept beside ``checkpoint.pt``
(``--keep-checkpoints``; ``adn train`` and ``adn detect train`` also accept their old flag ``--keep-last``).
In ``adn train-lm``, ``keep_last`` / ``--keep-last`` keep their meaning: the decoder layers kept out of
every stage (as in :func:`adn.convert.llama.convert_decoder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def need(ok: bool, message: str) -> None:
    """The check of one setting: a ``ValueError`` with ``message`` (which names the flag) unless ``ok``."""
    if not ok:
        raise ValueError(message)


@dataclass
class RunConfig:
    """The fields shared by every training command's settings (see the module's docstring)."""

    output_dir: str = "runs/adn"
    resume: str | None = None  # checkpoint to continue from (the run in output_dir)
    overwrite: bool = False  # a fresh run may delete another run's files in output_dir
    keep_checkpoints: int = 0  # numbered checkpoints kept beside checkpoint.pt (0: only checkpoint.pt)
    seed: int = 0
    lr: float = 0.1
    batch_size: int = 1
    progress: bool = True

    def validate(self) -> None:
        """The checks of the shared fields; a subclass adds its own after calling this."""
        need(
            not (self.overwrite and self.resume),
            "--overwrite and --resume exclude each other: --resume continues "
            "the run in --output-dir, --overwrite replaces it",
        )
        need(math.isfinite(self.lr), f"--lr must be a finite number, got {self.lr}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        need(
            self.keep_checkpoints >= 0,
            f"--keep-checkpoints (--keep-last) must be >= 0 (0: only checkpoint.pt), got {self.keep_checkpoints}",
        )

"""Per-depth batch-norm statistics measured into a checkpoint file: what ``adn recalibrate`` does, and what
``adn train`` does by itself at the end of a run whose depths need them.

A network trained with ``--method joint`` (labels for the super-net and the base-net) and skip-aware norms
runs its intermediate depths, never trained explicitly, up to 0.8 points lower on its running statistics
than on statistics measured at its own depth (docs/reproduction.md). :func:`store_depth_statistics`
measures them once (:func:`adn.record_depth_statistics`, on the same un-augmented training images for
every depth) and stores them in the checkpoint, atomically, where every command that runs a depth reads
them (:mod:`adn.core.depth_statistics`). :func:`after_training` is the end of ``adn train``: it stores them
for the runs that want them (:func:`wants_depth_statistics`), unless the checkpoint holds them already.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..core.depth_statistics import CHECKPOINT_KEY, depth_statistics_payload, record_depth_statistics
from ..core.recalibrate import batch_norms
from ..errors import CheckpointError, first_line
from ..training.run_folder import replace_checkpoint
from ..utils.checkpoint_file import LATEST
from .checkpoint import load_network
from .data import calibration_loader, checkpoint_data, collate_readable_pairs

BATCHES = 50  # training batches per depth: adn recalibrate --batches, adn train --depth-statistics-batches
BATCH_SIZE = 256  # images per batch: adn recalibrate -b (adn train measures with the same)


def store_depth_statistics(
    source: str | Path,
    output: str | Path | None = None,
    *,
    batches: int = BATCHES,
    batch_size: int = BATCH_SIZE,
    workers: int = 0,
    device: torch.device | str = "cpu",
    data: str | None = None,
    data_path: str | None = None,
    skip_bad_images: bool = False,
    by: str = "adn recalibrate",
    progress=None,
    unless_stored: bool = False,
) -> dict:
    """Measure the batch-norm statistics of every depth of the network in checkpoint ``source`` on
    ``batches`` batches of ``batch_size`` training images (of its data set, or ``data``/``data_path``) and
    store them in ``output`` (default: replace ``source``, atomically). ``by`` names what measured them
    (shown by eval and export); ``progress(config)`` is called before each depth. With ``unless_stored``,
    a checkpoint that holds them already is left as it is. Returns a summary: ``checkpoint``, ``depths``
    (0, and nothing written, for a network without batch norms), ``batches``, ``images_per_depth``,
    ``seconds``, and ``already_stored`` when nothing was measured for that reason."""
    source = Path(source)
    output = Path(output or source)
    before = _identity(source)
    net, ckpt = load_network(source, depth_statistics=False)  # stored rows are replaced, damaged or not
    summary = {
        "checkpoint": str(output),
        "depths": 2**net.num_stages,
        "batches": batches,
        "images_per_depth": 0,
        "seconds": 0.0,
    }
    if unless_stored and ckpt.get(CHECKPOINT_KEY) is not None:
        return {**summary, "already_stored": True}
    if not batch_norms(net):  # a ViT, say: nothing to measure
        return {**summary, "depths": 0}
    train = checkpoint_data(ckpt["meta"], source, data, data_path, skip_bad_images=skip_bad_images).train
    loader = calibration_loader(
        train, batch_size, batches, workers, collate_readable_pairs if skip_bad_images else None
    )
    device = torch.device(device)
    net.to(device)
    start = time.perf_counter()
    images = record_depth_statistics(net, loader, batches, device=device, progress=progress, by=by)
    summary.update(images_per_depth=images, seconds=round(time.perf_counter() - start, 1))
    net.to("cpu")
    if output.resolve() == source.resolve() and _identity(source) != before:
        raise CheckpointError(
            f"{source} changed while its statistics were measured (is a training run still writing "
            f"it?); it was not replaced. Run adn recalibrate again once it is finished, or write "
            f"a copy with --output"
        )
    replace_checkpoint(output, {**ckpt, CHECKPOINT_KEY: depth_statistics_payload(net)})
    return summary


def _identity(path: Path) -> tuple | None:
    """What changes when a file is rewritten or replaced (an atomic replace gives a new inode); None for
    a missing file (load_network then says what is wrong)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def wants_depth_statistics(cfg) -> bool:
    """Whether a run of these settings (an :class:`adn.vision.train_config.TrainConfig`) stores per-depth
    statistics when it ends: as ``--depth-statistics``/``--no-depth-statistics`` say, else for
    ``--method joint`` with skip-aware norms, whose intermediate depths need them. Not for the paper's
    Algorithm 1 (``--method adn``): its distillation keeps every depth right on the running statistics,
    and it stays exactly the published method, evaluated as published."""
    if cfg.depth_statistics is not None:
        return bool(cfg.depth_statistics)
    return cfg.method == "joint" and cfg.skip_aware_norm


def after_training(cfg, device: torch.device | str = "cpu", log=print) -> dict | None:
    """The end of ``adn train`` (the main process, once the last epoch is saved; never after an
    interruption): store per-depth statistics in the run's ``checkpoint.pt`` when the run wants them
    (:func:`wants_depth_statistics`) and it does not hold them yet, so that a resumed run that had already
    finished measures nothing again. Returns the summary of :func:`store_depth_statistics`, or None when
    nothing was measured. A failure is a warning naming the fix, not an error: the training is done and
    its checkpoint is whole."""
    checkpoint = Path(cfg.output_dir) / LATEST
    if not wants_depth_statistics(cfg) or not checkpoint.is_file():
        return None
    started = []

    def announce(config) -> None:  # once, when the measurement really starts
        if not started:
            started.append(config)
            log(
                f"measuring each depth's batch-norm statistics on {cfg.depth_statistics_batches} x {BATCH_SIZE} "
                f"training images (--no-depth-statistics skips this) ..."
            )

    try:
        summary = store_depth_statistics(
            checkpoint,
            batches=cfg.depth_statistics_batches,
            workers=cfg.workers,
            device=device,
            skip_bad_images=cfg.skip_bad_images,
            by="adn train",
            progress=announce,
            unless_stored=True,
        )
    except KeyboardInterrupt:
        log(
            f"adn: interrupted while measuring per-depth batch-norm statistics; {checkpoint} is whole, without them. "
            f"Measure them with: adn recalibrate --checkpoint {checkpoint}"
        )
        raise
    except Exception as error:  # the run itself succeeded: say what is missing and how to add it
        log(
            f"adn: warning: could not store per-depth batch-norm statistics in {checkpoint} ({type(error).__name__}: "
            f"{first_line(error, 200)}); the trained checkpoint is whole. Measure them with: adn recalibrate "
            f"--checkpoint {checkpoint}"
        )
        return None
    if summary.get("already_stored"):
        log(f"per-depth batch-norm statistics: {checkpoint} holds them already")
        return None
    if summary["depths"] == 0:
        log(f"per-depth batch-norm statistics: {cfg.model} has no batch norms, nothing to store")
        return None
    log(
        f"stored the batch-norm statistics of {summary['depths']} depths ({summary['images_per_depth']} training "
        f"images each, {summary['seconds']} s) in {checkpoint}: adn eval, predict, serve and export run each depth "
        f"with its own statistics"
    )
    return summary

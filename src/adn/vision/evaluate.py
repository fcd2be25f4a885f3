"""Accuracy of sub-networks, and the full per-sub-network report of ``adn eval``."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..runtime.profile import profile_subnetworks
from ..core.recalibrate import load_norm_state, norm_state, recalibrate_norms
from ..core.skip import SkipConfig


@torch.no_grad()
def evaluate_accuracy(
    net: nn.Module,
    loader: DataLoader,
    configs,
    device="cpu",
    progress: bool = False,
    description: str = "eval",
    sum_over_processes=None,
    recalibrate: tuple | None = None,
) -> dict[str, dict[str, float]]:
    """Top-1 and top-5 accuracy (percent) of each sub-network in ``configs``, reading the data once:
    every batch is run through every requested sub-network. In distributed training each process
    passes its own shard of the data and ``sum_over_processes`` (a function summing a tensor over the
    processes): counts are summed before dividing, so shards of unequal size are weighted correctly.

    ``recalibrate=(training_batches, N)``: before each sub-network is evaluated, its batch-norm
    statistics are recomputed on the first N of ``training_batches`` (:func:`adn.recalibrate_norms`);
    the network's own statistics (per-depth rows included, :mod:`adn.depth_statistics`) are restored
    afterwards. The data is then read once per sub-network.
    Repeated and aliased depths (``super`` and ``FFF``) are evaluated once."""
    configs = list(dict.fromkeys(SkipConfig(c, net.num_stages) for c in configs))
    if recalibrate is not None:
        calibration, num_batches = recalibrate
        saved, results = norm_state(net), {}
        try:
            for config in configs:
                recalibrate_norms(net, calibration, num_batches, skip=config, device=device)
                results.update(
                    evaluate_accuracy(net, loader, [config], device, progress, description, sum_over_processes)
                )
        finally:
            load_norm_state(net, saved)
        return results
    correct1 = {str(c): 0 for c in configs}
    correct5 = dict(correct1)
    seen = 0
    was_training = net.training
    net.eval()
    try:
        for images, targets in tqdm(loader, desc=description, disable=not progress, leave=False):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            seen += targets.numel()
            for config in configs:
                try:
                    logits = net(images, skip=config)
                except RuntimeError as error:
                    if seen > targets.numel():  # not the first batch: not a mismatch of the input's shape
                        raise
                    raise ValueError(
                        f"the network cannot process images of shape {tuple(images.shape[1:])} "
                        f"({str(error).splitlines()[0][:200]}); evaluate on images like those it was "
                        f"trained on (same channels and size)"
                    ) from error
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hits = top.eq(targets[:, None])
                correct1[str(config)] += hits[:, 0].sum().item()
                correct5[str(config)] += hits.any(dim=1).sum().item()
    finally:
        net.train(was_training)
    if sum_over_processes is not None:
        keys = list(correct1)
        counts = [seen] + [correct1[k] for k in keys] + [correct5[k] for k in keys]
        counts = sum_over_processes(torch.tensor(counts, dtype=torch.int64)).tolist()
        seen, n = counts[0], len(keys)
        correct1, correct5 = dict(zip(keys, counts[1 : 1 + n])), dict(zip(keys, counts[1 + n :]))
    if seen == 0:
        raise ValueError("the evaluation dataset is empty")
    return {key: {"acc1": 100.0 * correct1[key] / seen, "acc5": 100.0 * correct5[key] / seen} for key in correct1}


def evaluate_subnetworks(
    net: nn.Module,
    loader: DataLoader,
    configs,
    example: torch.Tensor,
    device="cpu",
    latency: bool = True,
    warmup: int = 3,
    repeats: int = 10,
    progress: bool = True,
    backend: str = "eager",
    recalibrate: tuple | None = None,
) -> list[dict]:
    """``adn eval``'s rows: skip, acc1, acc5, params, macs, latency_ms (+ spread, batch size, threads).
    ``recalibrate``: as in :func:`evaluate_accuracy`."""
    configs = list(dict.fromkeys(SkipConfig(c, net.num_stages) for c in configs))
    accuracy = evaluate_accuracy(net, loader, configs, device=device, progress=progress, recalibrate=recalibrate)
    rows = profile_subnetworks(net, example, configs, latency=latency, warmup=warmup, repeats=repeats, backend=backend)
    for row in rows:
        row.update(accuracy[row["skip"]])
    return rows

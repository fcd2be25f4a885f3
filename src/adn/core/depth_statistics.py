"""Per-depth batch-norm statistics: every sub-network normalizes with statistics measured at its own depth.

A batch norm keeps one pair of running averages. In an adaptive depth network most of its 2^N depths
are never run while training, so at test time they normalize with averages collected at other depths.
Networks trained with Algorithm 1 barely notice (distillation keeps every stage's output distribution
the same whether the stages before it skip or not), but other ways of training do: trained jointly on
the super-net and base-net alone, the six intermediate depths of a ResNet-20 read up to 0.8 points lower
with their running averages than with statistics measured at their own depth (docs/reproduction.md).

:func:`record_depth_statistics` measures them once, for every depth, on a few training batches
(:func:`adn.recalibrate_norms` at each depth) and keeps one row per depth in each batch norm
(:class:`adn.layers.DepthStatisticsNorm`). From then on, in eval mode, every way of running a depth
uses its own row: ``net.skip = ...``, ``net(x, skip=...)``, ``net.skipping(...)``, ``net.subnet(...)``
and everything built on them (``adn eval``, ``serve``, ``export``, ``predict``). Switching depth stays
free: the row is chosen per forward, nothing is copied. Training mode ignores the rows (they describe
the weights they were measured with; record them again after training further).

Checkpoints carry them under ``"depth_statistics"`` (``adn recalibrate`` writes it, and so does ``adn
train`` at the end of a run that needs them; :func:`adn.load` restores it), with what measured them; the
weights' ``state_dict`` is unchanged, so training code, resuming and ``--init-from`` never see them. Rows
describe the weights they were measured with: once the weights change (an optimizer step,
``load_state_dict``), the network warns and runs with its running statistics again.
:func:`adn.recalibrate_norms` at one depth updates that depth's row too.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .layers import DepthStatisticsNorm
from .recalibrate import batch_norms, load_norm_state, norm_state, recalibrate_norms
from .skip import SkipConfig

CHECKPOINT_KEY = "depth_statistics"
DEFAULT_BY = "adn recalibrate"  # what measured a network's rows, when nothing else is said


class DepthStatisticsError(ValueError):
    """Stored per-depth statistics that do not fit the network they are loaded into."""


def has_depth_statistics(net: nn.Module) -> bool:
    return bool(net.__dict__.get("adn_depth_statistics"))


def weights_version(parameters) -> int:
    """A number that every in-place change of one of ``parameters`` increases (PyTorch's version
    counters). Checked on every forward of a network with rows: ~25 µs for ResNet-50's 215 tensors, where
    walking the module tree for them took 370."""
    return sum(p._version for p in parameters)


def rows_apply(net: nn.Module) -> bool:
    """Whether the network's forward should read its per-depth rows: it has them and its weights are
    still the ones they were measured with (else: a warning, once, and the running statistics)."""
    stored = net.__dict__.get("adn_depth_statistics")
    if not stored or stored.get("stale"):
        return False
    version = weights_version(stored["parameters"])
    if stored["version"] is None:  # a copy (deepcopy, unpickling): its counters start afresh
        stored["version"] = version
    elif version != stored["version"]:
        stored["stale"] = True
        warnings.warn(
            "the weights changed since the per-depth batch-norm statistics were measured (training, "
            "load_state_dict): every depth runs with the running statistics again; measure them anew with "
            "adn.record_depth_statistics, or adn recalibrate for a checkpoint",
            stacklevel=3,
        )
        return False
    return True


def statistics_in_use(net: nn.Module) -> str:
    """Which batch-norm statistics the depths of ``net`` run with, in words (for manifests and reports)."""
    if not rows_apply(net):
        return "running"
    stored = net.__dict__["adn_depth_statistics"]
    measured = len(stored.get("depths", ()))
    which = "" if measured == 2**net.num_stages else f", measured for {measured} of {2**net.num_stages} depths"
    return f"per depth ({stored.get('images', 0)} training images each{which}, {stored.get('by') or DEFAULT_BY})"


def _install(net: nn.Module, images: int, depths, by: str | None = None) -> list[nn.Module]:
    """Give every batch norm one row of statistics per depth (kept where it has them, else initialized
    to its running statistics), and note what was measured, and by what (``by``)."""
    rows = 2**net.num_stages
    norms = [DepthStatisticsNorm.convert(norm, rows) for norm in batch_norms(net)]
    previous = net.__dict__.get("adn_depth_statistics") or {}
    measured = sorted(set(previous.get("depths", ())) | {str(SkipConfig(d, net.num_stages)) for d in depths})
    parameters = list(net.parameters())
    net.__dict__["adn_depth_statistics"] = {
        "images": images,
        "depths": measured,
        "parameters": parameters,
        "version": weights_version(parameters),
        "by": by,
    }
    return norms


@torch.no_grad()
def record_depth_statistics(
    net: nn.Module,
    batches: Iterable,
    num_batches: int,
    configs=None,
    device: torch.device | str | None = None,
    progress=None,
    by: str | None = None,
) -> int:
    """Measure the batch-norm statistics of each depth in ``configs`` (default: all 2^N) on the first
    ``num_batches`` of ``batches`` (training images without random augmentation, the same for every depth)
    and keep them in the network, one row per depth (rows of other depths recorded earlier are kept).
    The running statistics are left as they were. ``progress(config)`` is called before each depth.
    ``by``: what measured them, for reports and checkpoints (default: ``adn recalibrate``).
    Returns the number of images used per depth (0 for a network without batch norms, e.g. a ViT: there
    is nothing to record)."""
    if not batch_norms(net):
        return 0
    configs = SkipConfig.all(net.num_stages) if configs is None else [SkipConfig(c, net.num_stages) for c in configs]
    running = norm_state(net)
    norms = batch_norms(net)
    measured: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = []
    images = 0
    try:
        for config in configs:
            if progress is not None:
                progress(config)
            images = recalibrate_norms(net, batches, num_batches, skip=config, device=device)
            measured.append(
                (config.index, [(n._buffers["running_mean"].clone(), n._buffers["running_var"].clone()) for n in norms])
            )
            load_norm_state(net, running)
    finally:
        load_norm_state(net, running)
    # Installed only once every depth was measured: an error above leaves the network as it was.
    _install(net, images, configs, by)
    for row, stats in measured:
        for norm, (mean, var) in zip(norms, stats):
            norm.depth_running_mean[row] = mean
            norm.depth_running_var[row] = var
    return images


def drop_depth_statistics(net: nn.Module) -> None:
    """Go back to the running statistics at every depth (the rows are deleted)."""
    for module in net.modules():
        if isinstance(module, DepthStatisticsNorm):
            module.use_row(None)
            module.__class__ = type(module).__mro__[2]
    net.__dict__.pop("adn_depth_statistics", None)


def depth_statistics_payload(net: nn.Module) -> dict | None:
    """What a checkpoint stores under ``"depth_statistics"`` (None without them): for each batch norm,
    by its name in the network, the ``(2**N, channels)`` tables of means and variances."""
    stored = net.__dict__.get("adn_depth_statistics")
    if not stored:
        return None
    norms = {
        name: {"mean": module.depth_running_mean.detach().cpu(), "var": module.depth_running_var.detach().cpu()}
        for name, module in net.named_modules()
        if isinstance(module, DepthStatisticsNorm)
    }
    payload = {"images": int(stored.get("images", 0)), "depths": list(stored.get("depths", ())), "norms": norms}
    if stored.get("by"):
        payload["measured_by"] = stored["by"]
    return payload


@torch.no_grad()
def load_depth_statistics(net: nn.Module, payload, source: str = "checkpoint") -> None:
    """Install the per-depth statistics a checkpoint stores (see :func:`depth_statistics_payload`),
    refusing ones that do not fit the network."""
    fix = f"; measure them anew with: adn recalibrate --checkpoint {source}"
    if not isinstance(payload, dict) or not isinstance(payload.get("norms"), dict):
        raise DepthStatisticsError(f"{source}: its per-depth batch-norm statistics are malformed{fix}")
    norms = dict((name, m) for name, m in net.named_modules() if m in set(batch_norms(net)))
    stored = payload["norms"]
    if set(stored) != set(norms):
        missing, extra = sorted(set(norms) - set(stored)), sorted(set(stored) - set(norms))
        raise DepthStatisticsError(
            f"{source}: its per-depth batch-norm statistics name other norms than the network "
            f"has (missing {missing[:3]}, unknown {extra[:3]}){fix}"
        )
    rows = 2**net.num_stages
    for name, norm in norms.items():
        for part in ("mean", "var"):
            table = stored[name].get(part) if isinstance(stored[name], dict) else None
            expected = (rows, norm.num_features)
            if (
                not isinstance(table, torch.Tensor)
                or tuple(table.shape) != expected
                or not torch.isfinite(table).all()
                or (part == "var" and bool((table < 0).any()))
            ):
                shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
                raise DepthStatisticsError(
                    f"{source}: per-depth {part} of {name} is {shape}, expected finite values "
                    f"of shape {expected} (variances >= 0){fix}"
                )
    depths = payload.get("depths")
    if not isinstance(depths, list):
        depths = [str(c) for c in SkipConfig.all(net.num_stages)]
    try:
        depths = [SkipConfig(d, net.num_stages) for d in depths]
    except ValueError as error:
        raise DepthStatisticsError(
            f"{source}: its per-depth batch-norm statistics list invalid depths ({error}){fix}"
        ) from error
    by = payload.get("measured_by")
    _install(net, int(payload.get("images", 0)), depths, by[:80] if isinstance(by, str) and by.isprintable() else None)
    for name, norm in norms.items():
        norm.depth_running_mean.copy_(stored[name]["mean"])
        norm.depth_running_var.copy_(stored[name]["var"])

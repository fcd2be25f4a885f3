"""Looking inside a trained adaptive depth network (``adn analyze``).

- :func:`norm_distances` — for every skip-aware norm, how far its running mean is from its twin's
  (the paper's Fig. 3b). The paper's finding: near zero at the first norm of each stage (the
  previous stage's output hardly depends on whether it skipped, thanks to sub-path
  specialization), large further in.
- :func:`gradcam` — Grad-CAM maps after each block of one stage, at any depth (the paper's Fig. 4):
  the blocks a sub-network skips have no map.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.atomic import atomic_write
from ..core.layers import SkippableBlock, is_skipped
from ..core.skip import SkipConfig


class AnalysisError(ValueError):
    """The analysis does not apply to this network; the message says why."""


def norm_distances(net: nn.Module) -> list[dict]:
    """One row per skip-aware norm with running statistics, in forward order within each stage:
    ``stage``, ``index`` (0 = first norm of the stage), ``name``, ``channels`` and ``distance``, the
    root-mean-square difference between the running means of the norm and its twin."""
    names = {id(m): name for name, m in net.named_modules()}
    rows = []
    for stage_index, stage in enumerate(net.adn_stages):
        for index, norm in enumerate(stage.norms):
            mine, twin = getattr(norm, "running_mean", None), getattr(norm.twin, "running_mean", None)
            if mine is None or twin is None:
                continue
            distance = (mine.float() - twin.float()).pow(2).mean().sqrt().item()
            rows.append(
                {
                    "stage": stage_index,
                    "stage_name": stage.name,
                    "index": index,
                    "name": names[id(norm)],
                    "channels": mine.numel(),
                    "distance": distance,
                }
            )
    if not rows:
        raise AnalysisError(
            "no skip-aware norm with running statistics: the norm distance needs BatchNorm twins "
            "(the network was converted with --no-skip-aware-norm, or its norms are LayerNorms)"
        )
    return rows


def summarize_norm_distances(rows: list[dict]) -> dict:
    """Mean distance at the first norm of the stages versus at all the others."""
    first = [r["distance"] for r in rows if r["index"] == 0]
    rest = [r["distance"] for r in rows if r["index"] > 0]
    return {"first_norm_mean": sum(first) / len(first), "other_norms_mean": sum(rest) / len(rest) if rest else math.nan}


def plot_norm_distances(series: dict[str, list[dict]], path: str | os.PathLike, title: str = "") -> Path:
    """Bars of the distance of every skip-aware norm (x: norms in forward order, stages separated),
    one bar group per labelled network; first norms of stages hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = next(iter(series.values()))
    positions, labels, boundaries = [], [], []
    x = 0.0
    for i, row in enumerate(reference):
        if i and row["index"] == 0:
            boundaries.append(x + 0.25)
            x += 0.5
        positions.append(x)
        labels.append(row["name"])
        x += 1.0
    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * len(reference) + 2), 4.5))
    width = 0.8 / len(series)
    for k, (label, rows) in enumerate(series.items()):
        offset = (k - (len(series) - 1) / 2) * width
        bars = ax.bar([p + offset for p in positions], [r["distance"] for r in rows], width, label=label)
        for bar, row in zip(bars, rows):
            if row["index"] == 0:
                bar.set_hatch("//")
    for b in boundaries:
        ax.axvline(b, color="grey", lw=0.8, ls=":")
    ax.set_xticks(positions, labels, rotation=75, fontsize=7)
    ax.set_ylabel("RMS difference of running means")
    ax.set_title(title or "Running means, norm vs twin (hatched: first norm of a stage)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def first_image_per_class(dataset, count: int) -> torch.Tensor:
    """The first ``count`` images of ``dataset`` whose classes differ (fewer if it has fewer classes)."""
    picked, seen = [], set()
    for index in range(len(dataset)):
        if len(picked) == count:
            break
        image, label = dataset[index]
        if label not in seen:
            seen.add(label)
            picked.append(image)
    return torch.stack(picked)


# ----- Grad-CAM ------------------------------------------------------------------------------------------------
def gradcam(net: nn.Module, images: torch.Tensor, stage: int, skip, targets: torch.Tensor | None = None) -> list:
    """Grad-CAM (Selvaraju et al.) after each block of ``net.adn_stages[stage]`` in sub-network ``skip``.

    Returns one entry per block (shared then skippable): a ``(B, H, W)`` tensor in [0, 1] at the input
    resolution, or ``None`` for a block the sub-network skips. ``targets`` defaults to the predicted
    classes."""
    if not 0 <= stage < net.num_stages:
        raise AnalysisError(f"stage {stage} does not exist: the network has stages 0..{net.num_stages - 1}")
    controller = net.adn_stages[stage]
    blocks = controller.shared + controller.skippable
    activations: dict[int, torch.Tensor] = {}

    def keep(index):
        def hook(_module, _inputs, output):
            if output.dim() != 4:
                raise AnalysisError(
                    f"Grad-CAM needs convolutional feature maps (N, C, H, W); block {index} of stage "
                    f"{controller.name} gives shape {tuple(output.shape)}"
                )
            output.retain_grad()
            activations[index] = output

        return hook

    handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
    was_training = net.training
    net.eval()
    try:
        with net.skipping(SkipConfig(skip, net.num_stages)), torch.enable_grad():
            x = images.clone().requires_grad_(True)  # gradients must flow even into frozen first layers
            logits = net(x)
            chosen = logits.argmax(1) if targets is None else targets
            net.zero_grad(set_to_none=True)
            logits.gather(1, chosen[:, None]).sum().backward()
            # Asked inside the `skipping` block: the depth it sets is per thread, not in the modules' flags.
            skipped = [isinstance(block, SkippableBlock) and is_skipped(block) for block in blocks]
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
        net.zero_grad(set_to_none=True)
    maps = []
    for i in range(len(blocks)):
        if skipped[i]:
            maps.append(None)
            continue
        act = activations[i]
        weights = act.grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act).sum(1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        maps.append(cam / peak)
    return maps


def plot_gradcam(
    images: torch.Tensor, rows: dict[str, list], path: str | os.PathLike, title: str = "", mean=(0.0,), std=(1.0,)
) -> Path:
    """A grid: for each image, one row per labelled network, columns = the image then each block's map
    (blank where the block is skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = images.detach().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    shown = shown.clamp(0, 1)
    columns = 1 + max(len(maps) for maps in rows.values())
    n_rows = len(images) * len(rows)
    fig, axes = plt.subplots(n_rows, columns, figsize=(1.3 * columns + 1, 1.3 * n_rows + 0.6), squeeze=False)
    for i in range(len(images)):
        picture = shown[i].permute(1, 2, 0).squeeze(-1).numpy()
        for r, (label, maps) in enumerate(rows.items()):
            line = axes[i * len(rows) + r]
            line[0].imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            line[0].set_ylabel(label, fontsize=7)
            for c, cam in enumerate(maps, start=1):
                if cam is None:
                    line[c].text(0.5, 0.5, "skipped", ha="center", va="center", fontsize=7, color="grey")
                else:
                    line[c].imshow(picture, cmap="gray" if picture.ndim == 2 else None)
                    line[c].imshow(cam[i].cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
                if i == 0 and r == 0:
                    line[c].set_title(f"block {c - 1}", fontsize=8)
            for ax in line:
                ax.set_xticks([])
                ax.set_yticks([])
            for ax in line[len(maps) + 1 :]:
                ax.axis("off")
    fig.suptitle(title or "Grad-CAM after each block", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def cam_statistics(maps: list, hot: float = 0.5) -> list[float | None]:
    """Per block, the mean fraction of the image where the Grad-CAM map exceeds ``hot`` (the paper's
    "hot activation regions"); ``None`` for skipped blocks."""
    return [None if cam is None else (cam > hot).float().mean().item() for cam in maps]


def map_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation between two sets of maps."""
    a, b = a.flatten(1), b.flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return F.cosine_similarity(a, b, dim=1, eps=1e-8).mean().item()

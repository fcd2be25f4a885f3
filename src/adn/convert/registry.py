"""The shared conversion machinery and the registry of adapters (:func:`register_adapter`); the adapters
themselves are the other modules of this package, registered when :mod:`adn.convert` is imported."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..core.layers import IdleWhenSkipped, SkipAwareNorm, SkippableBlock, SkippableStage
from ..core.network import AdaptiveDepthNetwork

try:  # torchvision's detection models use FrozenBatchNorm2d; twin it like any other norm
    from torchvision.ops import FrozenBatchNorm2d
except ImportError:  # pragma: no cover
    FrozenBatchNorm2d = nn.BatchNorm2d

DEFAULT_NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, FrozenBatchNorm2d)


def split_point(num_blocks: int) -> int:
    """How many leading blocks of a stage are shared: ``min(n - 1, ceil(n / 2))`` (authors' rule).
    ResNet-50's [3, 4, 6, 3] gives shared [2, 2, 3, 2], skippable [1, 2, 3, 1]."""
    return min(num_blocks - 1, math.ceil(num_blocks / 2))


@dataclass
class StageSpec:
    """Where one stage is: its blocks in execution order. ``num_shared`` overrides the split rule;
    ``outside_branch`` names sub-modules of a block (e.g. ``downsample``) that see only the stage
    input and so need no skip-aware twin; ``also_switch`` lists modules outside the stage (a stem, a
    patch-merging layer) whose norms get twins switched by this stage; ``idle_when_skipped`` names
    sub-modules of each shared block that are the identity while the stage skips (Swin's
    ``stochastic_depth``: the authors' shared blocks drop no paths in a sub-network that skips them)."""

    name: str
    blocks: Sequence[nn.Module]
    num_shared: int | None = None
    outside_branch: tuple[str, ...] = ("downsample",)
    also_switch: Sequence[nn.Module] = ()  # modules outside the stage whose norms switch with it
    idle_when_skipped: tuple[str, ...] = ()


@dataclass
class Adapter:
    name: str
    description: str
    matches: Callable[[nn.Module], bool]
    stages: Callable[[nn.Module], list[StageSpec]]
    channel_dim: int = 1  # where channels are in stage outputs: 1 for NCHW, -1 for tokens / NHWC
    # The family's own norm classes (e.g. a library's RMSNorm), found in the model, twinned besides the defaults.
    norm_types: Callable[[nn.Module], tuple[type, ...]] | None = None


_ADAPTERS: list[Adapter] = []


def register_adapter(
    name: str,
    description: str,
    matches: Callable[[nn.Module], bool],
    channel_dim: int = 1,
    norm_types: Callable[[nn.Module], tuple[type, ...]] | None = None,
):
    """Decorator registering ``fn(model) -> list[StageSpec]`` as the adapter of a model family.
    ``channel_dim`` tells feature distillation where the channels are in the stage outputs;
    ``norm_types(model)`` names norm classes of the family that are not torch's (they get twins too)."""

    def wrap(fn: Callable[[nn.Module], list[StageSpec]]):
        _ADAPTERS.append(Adapter(name, description, matches, fn, channel_dim, norm_types))
        return fn

    return wrap


def supported_families() -> list[str]:
    return [f"{a.name} ({a.description})" for a in _ADAPTERS]


def convert(
    model: nn.Module,
    *,
    skip_aware_norm: bool = True,
    stages: Sequence[str] | None = None,
    norm_types: tuple[type, ...] = DEFAULT_NORM_TYPES,
    channel_dim: int = 1,
) -> nn.Module:
    """Convert ``model`` into an adaptive depth network, in place, and return it.

    Weights are kept and every skip-aware twin starts as a copy of its norm, so in every sub-network
    the converted model initially computes what the original computes with those blocks removed; in
    super-net mode it computes exactly what the original computed.

    Args:
        model: an instance of a supported family (see :func:`supported_families`), or any residual
            model when ``stages`` is given.
        skip_aware_norm: give the norms of shared blocks a twin used when their stage skips (the paper's
            skip-aware normalization). ``False`` is the ablation without it.
        stages: for your own models: names of the sub-modules (as in ``model.named_modules()``) that
            hold each stage's residual blocks, in order, e.g. ``["layer1", "layer2"]``.
        norm_types: which module types count as norms to twin.
        channel_dim: with ``stages``: the channel dimension of the stage outputs (1 for NCHW feature
            maps, -1 for token sequences or NHWC maps), used by feature distillation.
    """
    if isinstance(model, AdaptiveDepthNetwork):
        raise ValueError("this model is already an adaptive depth network; convert the original model once")
    if stages is not None:
        specs, family = _specs_from_names(model, stages), "custom"
    else:
        adapter = next((a for a in _ADAPTERS if a.matches(model)), None)
        if adapter is None:
            raise TypeError(
                f"adn.convert does not support {type(model).__module__}.{type(model).__name__}. Supported families: "
                + "; ".join(supported_families())
                + ". For another residual model pass stages=[...] naming the containers of its residual blocks."
            )
        specs, family, channel_dim = adapter.stages(model), adapter.name, adapter.channel_dim
        if adapter.norm_types is not None:
            norm_types = tuple(norm_types) + tuple(adapter.norm_types(model))
    return convert_stages(
        model, specs, skip_aware_norm=skip_aware_norm, norm_types=norm_types, family=family, channel_dim=channel_dim
    )


def convert_stages(
    model: nn.Module,
    specs: Sequence[StageSpec],
    *,
    skip_aware_norm: bool = True,
    norm_types: tuple[type, ...] = DEFAULT_NORM_TYPES,
    family: str = "custom",
    channel_dim: int = 1,
) -> nn.Module:
    """The shared machinery behind every adapter. Stages with a single block have nothing to skip and
    are left as they are (they are not counted in ``num_stages``)."""
    controllers = []
    for spec in specs:
        blocks = list(spec.blocks)
        if len(blocks) < 2:
            continue
        num_shared = split_point(len(blocks)) if spec.num_shared is None else spec.num_shared
        if not 1 <= num_shared < len(blocks):
            raise ValueError(
                f"stage {spec.name!r} has {len(blocks)} blocks; num_shared must be in 1..{len(blocks) - 1}, "
                f"got {num_shared}"
            )
        shared, skippable = blocks[:num_shared], blocks[num_shared:]
        norms = []
        if skip_aware_norm:
            for block in shared:
                norms += [SkipAwareNorm.convert(m) for m in _norms_in_branch(block, norm_types, spec.outside_branch)]
            for module in spec.also_switch:
                norms += [SkipAwareNorm.convert(m) for m in _norms_in_branch(module, norm_types, ())]
        for block in skippable:
            SkippableBlock.convert(block)
        idle = [
            IdleWhenSkipped.convert(block.get_submodule(name)) for block in shared for name in spec.idle_when_skipped
        ]
        controllers.append(SkippableStage(spec.name, shared, skippable, norms, idle))
    if not controllers:
        raise ValueError(f"{type(model).__name__} has no stage with two or more blocks: there is nothing to skip")
    info = {
        "family": family,
        "skip_aware_norm": skip_aware_norm,
        "channel_dim": channel_dim,
        "stages": [{"name": c.name, "shared": len(c.shared), "skippable": len(c.skippable)} for c in controllers],
    }
    return AdaptiveDepthNetwork.attach(model, controllers, info)


def _norms_in_branch(block: nn.Module, norm_types: tuple[type, ...], outside: tuple[str, ...]) -> list[nn.Module]:
    found = []
    for name, module in block.named_modules():
        if any(name == o or name.startswith(o + ".") for o in outside):
            continue
        if isinstance(module, norm_types):
            found.append(module)
    return found


def _specs_from_names(model: nn.Module, names: Sequence[str]) -> list[StageSpec]:
    modules = dict(model.named_modules())
    specs = []
    for name in names:
        if name not in modules:
            close = [n for n in modules if n and name.split(".")[-1] in n][:5]
            raise ValueError(
                f"stages: {type(model).__name__} has no sub-module {name!r}"
                + (f"; similar names: {close}" if close else "")
            )
        container = modules[name]
        specs.append(StageSpec(name, list(container.children())))
    return specs

"""The adaptive depth network: the public face of a converted model.

``adn.convert`` gives the converted model the class ``Adaptive<OriginalClass>`` =
(:class:`AdaptiveDepthNetwork`, OriginalClass). It is still an instance of the original class (a
converted torchvision ``ResNet`` is a ``ResNet``), keeps its parameter names, and gains depth control:

    net.skip = "TTFF"            # select a sub-network
    net(x, skip="TTTT")          # or per call
    with net.skipping("base"): ...
    net.subnet("TTFF")           # a plain standalone module of that depth, sharing weights

Threads: ``net.skip = ...`` sets the default depth, for every thread. A per-call ``skip=`` and a
``skipping`` block set the depth of the current thread (or asyncio task) only, so threads can run one
network at different depths at once (see docs/method.md).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from .layers import (
    ACTIVE_DEPTH,
    STATISTICS_ROW,
    DepthStatisticsNorm,
    IdleWhenSkipped,
    SkipAwareNorm,
    SkippableBlock,
    SkippableStage,
    swap_in_subclass,
    original_class,
)
from .depth_statistics import rows_apply
from .skip import SkipConfig


class AdaptiveDepthNetwork:
    """Mixin added to a converted model's class. State: ``adn_stages`` (list of SkippableStage) and
    ``adn_info`` (how it was converted, for checkpoints and reports)."""

    adn_stages: list[SkippableStage]
    adn_info: dict

    @classmethod
    def attach(cls, model: nn.Module, stages: list[SkippableStage], info: dict) -> nn.Module:
        swap_in_subclass(model, cls, "Adaptive")
        # Set through __dict__: nn.Module.__setattr__ would not register a list of controllers anyway,
        # and this keeps them out of state_dict.
        model.__dict__["adn_stages"] = stages
        model.__dict__["adn_info"] = dict(info)
        return model

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        stored = self.__dict__.get("adn_depth_statistics")
        if stored:  # a copy (deepcopy, unpickling): the weights' version counters restart, so re-base them
            stored["version"] = None

    # ----- depth control -------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.adn_stages)

    @property
    def skip(self) -> SkipConfig:
        """The depth in effect here: that of the enclosing ``skipping`` block or per-call ``skip=`` if any,
        else the default."""
        active = ACTIVE_DEPTH.get()
        if active is not None and self in active:
            return active[self]
        return SkipConfig([stage.skip for stage in self.adn_stages])

    @skip.setter
    def skip(self, value) -> None:
        config = SkipConfig(value, num_stages=self.num_stages)
        active = ACTIVE_DEPTH.get()
        if active is not None and self in active:
            # Inside a ``skipping`` block: change this thread's depth until the block ends (as assigning
            # it there always did), not the default of every other thread.
            ACTIVE_DEPTH.set({**active, **self._depth_entries(config)})
            return
        for stage, flag in zip(self.adn_stages, config):
            stage.skip = flag

    @contextlib.contextmanager
    def skipping(self, value) -> Iterator[SkipConfig]:
        """Run a block of code at another depth; the previous depth is in effect again afterwards.

        The depth applies to the current thread (or asyncio task) only: other threads keep running at
        theirs. Threads started inside the block start at the default depth."""
        config = SkipConfig(value, num_stages=self.num_stages)
        active = ACTIVE_DEPTH.get()
        entries = self._depth_entries(config)
        token = ACTIVE_DEPTH.set(entries if active is None else {**active, **entries})
        try:
            yield config
        finally:
            ACTIVE_DEPTH.reset(token)

    def _depth_entries(self, config: SkipConfig) -> dict:
        """What :data:`adn.layers.ACTIVE_DEPTH` holds to run this network at ``config``."""
        entries: dict = {self: config}
        for stage, flag in zip(self.adn_stages, config):
            entries.update(stage.flags(flag))
        return entries

    # Inputs pass through untouched, positional or by keyword: Hugging Face models are called as
    # ``model(input_ids=..., past_key_values=...)`` (their ``generate`` does so), with no positional input.
    def forward(self, *args, skip=None, **kwargs):
        row = self._statistics_row(skip)
        token = STATISTICS_ROW.set(row) if row is not None else None
        try:
            if skip is None:
                return super().forward(*args, **kwargs)
            with self.skipping(skip):
                return super().forward(*args, **kwargs)
        finally:
            if token is not None:
                STATISTICS_ROW.reset(token)

    def _statistics_row(self, skip) -> int | None:
        """The row of per-depth norm statistics this forward reads (see :mod:`adn.depth_statistics`):
        None without them, in training mode, or once the weights changed since they were measured."""
        if self.training or not self.__dict__.get("adn_depth_statistics") or not rows_apply(self):
            return None
        config = self.skip if skip is None else SkipConfig(skip, num_stages=self.num_stages)
        return config.index

    def sub_networks(self) -> list[SkipConfig]:
        """All 2^N configurations of this network, super-net first."""
        return SkipConfig.all(self.num_stages)

    # ----- introspection -------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture_stage_outputs(self) -> Iterator[list[torch.Tensor]]:
        """Collect each stage's output during forward passes run inside the block (for feature
        distillation), without changing the forward signature. The list is refilled per forward."""
        outputs: list[torch.Tensor] = []
        handles = []

        def make_hook(index: int):
            def hook(_module, _inputs, output):
                if index == 0:
                    outputs.clear()
                outputs.append(output)

            return hook

        for index, stage in enumerate(self.adn_stages):
            handles.append(stage.output_module.register_forward_hook(make_hook(index)))
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    def active_parameters(self, skip=None) -> int:
        """Number of parameters a sub-network uses (skipped blocks and unused norm twins excluded)."""
        config = self.skip if skip is None else SkipConfig(skip, num_stages=self.num_stages)
        return sum(p.numel() for p in self.subnet(config).parameters())

    # ----- standalone sub-networks ---------------------------------------------------------------
    def subnet(self, skip, fold_bn: bool = False) -> nn.Module:
        """A plain module computing sub-network ``skip``: skipped blocks removed, each skip-aware norm
        resolved to the one in use, original classes restored. Parameters and buffers are *shared*
        with this network (training one trains the other); call ``copy.deepcopy`` for an independent
        copy.

        ``fold_bn=True`` returns an inference-only ``torch.fx.GraphModule`` in which every BatchNorm
        that follows a convolution is folded into it (new weights, not shared)."""
        config = SkipConfig(skip, num_stages=self.num_stages)
        # Deep-copy the module tree but not its tensors: pre-seeding the memo with every parameter
        # and buffer makes the copy reference the very same tensors.
        memo = {id(t): t for t in list(self.parameters()) + list(self.buffers())}
        plain = copy.deepcopy(self, memo)
        # The copy is not in any thread's per-call depth: its flags (its default depth) decide what _unload removes.
        for stage, flag in zip(plain.adn_stages, config):
            stage.skip = flag
        _unload(plain, config.index if rows_apply(self) else None)
        if fold_bn:
            from .fold import fold_batch_norms

            return fold_batch_norms(plain)
        return plain

    def extra_repr(self) -> str:
        base = super().extra_repr()
        mine = f"adn: {self.num_stages} stages, skip={self.skip}"
        return f"{base}, {mine}" if base else mine


def _unload(model: nn.Module, row: int | None) -> None:
    """Strip the skip machinery from a deep copy, in place (the copy's flags fix its depth; ``row`` is the
    depth's row of per-depth norm statistics, if the network has them; None: keep the running ones)."""
    for module in model.modules():
        if isinstance(module, DepthStatisticsNorm):
            module.use_row(row)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (SkippableBlock, IdleWhenSkipped)) and child.adn_skipped:
                _remove_child(parent, name, child)
            elif isinstance(child, SkipAwareNorm) and child.adn_skipped:
                setattr(parent, name, child.twin)
    for module in model.modules():
        if isinstance(module, (SkipAwareNorm, SkippableBlock, IdleWhenSkipped, DepthStatisticsNorm)):
            module._modules.pop("twin", None)
            module.__dict__.pop("adn_skipped", None)
            module.__class__ = original_class(module)
    model.__dict__.pop("adn_stages", None)
    model.__dict__.pop("adn_info", None)
    model.__dict__.pop("adn_depth_statistics", None)
    model.__class__ = type(model).__mro__[2]


def _remove_child(parent: nn.Module, name: str, child: nn.Module) -> None:
    if isinstance(parent, nn.Sequential):
        # Keep the other entries' names, so the sub-network's state_dict keys match the full network's.
        del parent._modules[name]
    elif isinstance(parent, nn.ModuleList):
        # A ModuleList is indexed by position: renumber what is left. Found by identity, not by name: after
        # an earlier removal from the same list renumbered it, ``name`` points at another module.
        kept = [m for m in parent.children() if m is not child]
        parent._modules.clear()
        for index, module in enumerate(kept):
            parent.add_module(str(index), module)
    else:
        setattr(parent, name, nn.Identity())

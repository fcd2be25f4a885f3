"""The skip machinery shared by every architecture.

Conversion is surgery on an existing model that keeps every parameter name: instead of wrapping
modules (which would rename ``layer1.0.bn1.weight``), it swaps the class of selected modules for a
subclass that adds one behaviour.

- :class:`SkippableBlock` — a residual block that, when its stage skips, is *not executed*: it returns
  its input unchanged. Skippable blocks are never the first block of a stage, so input and output
  shapes always agree; nothing is multiplied by zero and no MACs are spent.
- :class:`SkipAwareNorm` — a normalization layer with a *twin* (a second norm of the same type). The
  twin normalizes when the stage is skipped, because a shared block then feeds a different
  distribution downstream (paper, Sec. 3.2 "skip-aware BNs").
- :class:`SkippableStage` — the controller of one stage: its shared blocks, its skippable blocks and
  the norms to switch. Setting ``stage.skip`` flips plain Python flags: O(#modules in the stage), no
  weight copy, no module rebuilt. These flags are the network's *default* depth, shared by every thread.

A per-call depth (``net(x, skip=...)``, ``with net.skipping(...)``) does not touch the flags: it is held
in a :class:`contextvars.ContextVar`, so it applies to the calling thread (or asyncio task) only, and the
blocks and norms read it at forward time (:func:`is_skipped`).

The original parameters keep their names, twins live under ``<norm>.twin.*``; a state_dict of the
original model therefore loads into the converted model's super-net path unchanged.

- :class:`DepthStatisticsNorm` — a batch norm that, in eval mode, normalizes with running statistics
  measured at the depth being run (one row per depth, :mod:`adn.depth_statistics`), so that depths never
  trained explicitly do not borrow statistics collected at other depths.

A flag may also be a 0-dim bool *tensor* (and the row a 0-dim integer tensor): then the depth is an input of
the computation, not a Python constant, and the mixins choose with ``torch.cond``, which ``torch.export`` and
the ONNX exporter keep as a conditional (ONNX ``If``): a skipped part is still not executed. This is how one
exported program runs every depth (:mod:`adn.switchable`). An exporter that builds its conditionals itself
sets :data:`TRACED_CHOICE` (the switchable ONNX file: tracing ``torch.cond`` branches costs twice the export).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys
from collections.abc import Sequence
from contextvars import ContextVar

import torch
from torch import nn

_MODULE = sys.modules[__name__]
_SUBCLASS_CACHE: dict[tuple[type, type], type] = {}

# The depths set by per-call ``skip=`` and ``skipping`` blocks in the current context (thread / asyncio
# task): maps each such network to its SkipConfig and each of its skippable blocks and skip-aware norms to
# its flag. None (the common case) when no per-call depth is active. The dict is never mutated once set, so
# a context that copied it (a task started inside the block) cannot see later changes.
ACTIVE_DEPTH: ContextVar[dict | None] = ContextVar("adn_active_depth", default=None)

# The row of per-depth norm statistics (:class:`DepthStatisticsNorm`) the forward pass in progress reads:
# set by the forward of a network that has them, in eval mode, for the depth it runs; None otherwise. A 0-dim
# integer tensor when the depth is an input of an exported program (adn.switchable).
STATISTICS_ROW: ContextVar[int | torch.Tensor | None] = ContextVar("adn_statistics_row", default=None)


# How a traced (tensor) flag chooses between skipping and running a part: None (the default) for torch.cond,
# else a function ``choice(flag, skipped, run, x)`` that returns the chosen output. The switchable ONNX export
# sets one that runs the part unconditionally and marks the choice, and turns each mark into an ONNX ``If``
# afterwards (adn.runtime.onnx_choice): one flat trace instead of Dynamo tracing every branch.
TRACED_CHOICE: ContextVar = ContextVar("adn_traced_choice", default=None)


def is_skipped(module: nn.Module) -> bool | torch.Tensor:
    """Whether a skippable block or skip-aware norm is skipped right now: by the depth of the current call
    or ``skipping`` block if one covers it, else by its network's default depth (``net.skip``). A 0-dim bool
    tensor while a program whose depth is an input is traced (:mod:`adn.switchable`)."""
    active = ACTIVE_DEPTH.get()
    if active is None:
        return module.adn_skipped
    return active.get(module, module.adn_skipped)


def _choose(flag: torch.Tensor, skipped, run, x: torch.Tensor):
    """``skipped(x)`` if the traced flag is set, else ``run(x)``, as a conditional of the traced program, so
    that only the branch taken is executed (a multiply by the flag would run both)."""
    choice = TRACED_CHOICE.get()
    if choice is not None:
        return choice(flag, skipped, run, x)
    # The branches are closures: the module's parameters and the forward's other arguments are captured,
    # and torch.cond lifts the tensors among them into inputs of its branch graphs.
    # torch.cond traces its branches with Dynamo. Non-strict torch.export traces with torch.fx, which swaps the
    # functions registered with torch.fx.wrap (torchvision's shifted_window_attention) for wrappers without
    # their __defaults__, and Dynamo's guards on those crash (torch 2.14): the originals are put back while
    # the branches are traced.
    with _fx_patches_reverted():
        return torch.cond(flag, skipped, run, (x,))


@contextlib.contextmanager
def _fx_patches_reverted():
    """Undo torch.fx's patches while torch.cond traces its branches (see :func:`_choose`); torch.fx is private
    API, so a torch without it is left alone."""
    from torch.fx import _symbolic_trace as fx_trace

    patcher = getattr(fx_trace, "CURRENT_PATCHER", None)
    if patcher is None or not hasattr(patcher, "revert_all_patches"):
        yield
        return
    # Reverted and unregistered: Dynamo would re-apply a registered patcher's patches when it finishes
    # tracing, before it builds the guards that crash.
    patcher.revert_all_patches()
    fx_trace.CURRENT_PATCHER = None
    try:
        yield
    finally:
        fx_trace.CURRENT_PATCHER = patcher
        patcher.reapply_all_patches()


def _identity(x: torch.Tensor) -> torch.Tensor:
    # A branch of torch.cond may not return its input itself (an output aliasing an input is refused);
    # exporters turn the copy into ONNX Identity, which ONNX Runtime does not copy.
    return x.clone()


def _branch(forward, *args, **kwargs):
    """``forward`` as a branch of torch.cond: its other arguments bound, and its input copied when it returns
    it unchanged (stochastic depth and dropout do in eval mode; torch.cond refuses aliasing outputs)."""

    def run(x: torch.Tensor):
        out = forward(x, *args, **kwargs)
        return x.clone() if out is x else out

    return run


class SkippedTogether:
    """The traced flag of a run of skippable blocks that follow each other in one ``nn.Sequential`` (a stage's
    skippable part, :func:`sequential_run`): the first block executes them all in one conditional, the others
    then return their input. One ONNX ``If`` per stage instead of one per block: fewer branch boundaries for
    the runtime to cross (ONNX Runtime converts layouts at each), less to trace."""

    __slots__ = ("flag", "blocks")

    def __init__(self, flag: torch.Tensor, blocks: Sequence[nn.Module]):
        self.flag = flag
        self.blocks = tuple(blocks)


def sequential_run(blocks: Sequence[nn.Module], modules: Sequence[nn.Module]) -> bool:
    """Whether ``blocks`` are consecutive children, in this order, of one plain ``nn.Sequential`` among
    ``modules``: then the Sequential calls each with the output of the one before and nothing else, so the
    first can run them all (:class:`SkippedTogether`)."""
    if len(blocks) < 2:
        return False
    for parent in modules:
        if type(parent).forward is not nn.Sequential.forward:
            continue
        children = list(parent.children())
        for start, child in enumerate(children):
            if child is blocks[0]:
                run = children[start : start + len(blocks)]
                return len(run) == len(blocks) and all(a is b for a, b in zip(run, blocks))
    return False


def _run_together(forward, blocks: Sequence[nn.Module]):
    """A branch of torch.cond that runs ``forward`` (the first block's own forward) and then the original
    forward of each block in ``blocks`` on the output of the one before."""

    def run(x: torch.Tensor):
        out = forward(x)
        for block in blocks:
            out = super(SkippableBlock, block).forward(out)
        return x.clone() if out is x else out

    return run


def _identity_when_skipped(module: nn.Module, forward, x, *args, **kwargs):
    """The forward of a module that returns its input while skipped (:class:`SkippableBlock`,
    :class:`IdleWhenSkipped`): ``forward`` runs unless the module is skipped; a traced (tensor) flag makes
    the choice a conditional of the traced program."""
    flag = is_skipped(module)
    if isinstance(flag, SkippedTogether):
        if module is not flag.blocks[0]:
            return x  # run by the first block's conditional
        return _choose(flag.flag, _identity, _run_together(forward, flag.blocks[1:]), x)
    if isinstance(flag, torch.Tensor):
        return _choose(flag, _identity, _branch(forward, *args, **kwargs), x)
    if flag:
        return x
    return forward(x, *args, **kwargs)


def swap_in_subclass(module: nn.Module, mixin: type, prefix: str) -> None:
    """Give ``module`` the class ``<prefix><OriginalClass>`` = (mixin, OriginalClass).

    The subclass is created once per original class and registered in this module under a unique
    name. Instances pickle as "this mixin on that class" (:func:`converted_class`), not by the generated
    name, so a converted model saved whole (``torch.save(net)``) loads in a process that never
    converted anything."""
    if not issubclass(type(module), mixin):
        module.__class__ = converted_class(mixin, prefix, type(module))


def converted_class(mixin: type, prefix: str, base: type) -> type:
    """The class (mixin, base) named ``<prefix><base>``, created on first use."""
    key = (mixin, base)
    cls = _SUBCLASS_CACHE.get(key)
    if cls is None:
        name = f"{prefix}{base.__name__}"
        while hasattr(_MODULE, name):  # e.g. two libraries both defining ``Bottleneck``
            name += "_"
        cls = type(
            name,
            (mixin, base),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__reduce_ex__": _reduce_converted,
                "adn_recipe": (mixin, prefix, base),
            },
        )
        setattr(_MODULE, name, cls)
        _SUBCLASS_CACHE[key] = cls
    return cls


def _reduce_converted(self, protocol):
    # Pickle by recipe: the mixins and the original class are importable by name, the generated classes
    # are not (they exist only once something was converted in this process). The state is the usual one.
    return _new_converted, (_recipe(type(self)),), self.__getstate__()


def _recipe(cls: type):
    """``cls`` itself, or for a generated class ``(mixin, prefix, recipe of its base)``: a norm can carry
    two mixins, so the base may be generated too."""
    if "adn_recipe" not in cls.__dict__:
        return cls
    mixin, prefix, base = cls.adn_recipe
    return mixin, prefix, _recipe(base)


def _class_of(recipe) -> type:
    if isinstance(recipe, type):
        return recipe
    mixin, prefix, base = recipe
    return converted_class(mixin, prefix, _class_of(base))


def _new_converted(recipe):
    cls = _class_of(recipe)
    return cls.__new__(cls)


def original_class(module: nn.Module) -> type:
    """The class a converted module had before conversion (the class itself if not converted). A norm
    can carry two mixins (skip-aware and per-depth statistics), so the generated classes and the mixins
    are passed over in the method resolution order."""
    generated = set(_SUBCLASS_CACHE.values())
    for cls in type(module).__mro__:
        if cls not in generated and cls not in MIXINS:
            return cls
    raise TypeError(f"{type(module).__name__} has no original class")  # unreachable: object is in every MRO


class SkippableBlock:
    """Mixin for a block in the skippable part of a stage. Returns its input untouched when skipped."""

    adn_skipped: bool = False

    @classmethod
    def convert(cls, block: nn.Module) -> nn.Module:
        swap_in_subclass(block, cls, "Skippable")
        block.adn_skipped = False
        return block

    def forward(self, x, *args, **kwargs):
        return _identity_when_skipped(self, super().forward, x, *args, **kwargs)


class SkipAwareNorm:
    """Mixin for a norm inside a stage's shared blocks: ``self`` normalizes while the stage runs its
    skippable part, ``self.twin`` while it skips it."""

    adn_skipped: bool = False

    @classmethod
    def convert(cls, norm: nn.Module) -> nn.Module:
        if isinstance(norm, SkipAwareNorm):
            raise ValueError(f"{type(norm).__name__} is already switched by a stage; a norm can follow one stage only")
        # The twin is an exact copy, so a pretrained model keeps its function in every sub-network at
        # the start of training; training then specializes the twins to the skipped distribution.
        twin = copy.deepcopy(norm)
        swap_in_subclass(norm, cls, "SkipAware")
        norm.twin = twin
        norm.adn_skipped = False
        return norm

    def forward(self, x, *args, **kwargs):
        flag = is_skipped(self)
        if isinstance(flag, torch.Tensor):
            return self._forward_selected(flag, x, *args, **kwargs)
        if flag:
            return self.twin(x, *args, **kwargs)
        return super().forward(x, *args, **kwargs)

    def _forward_selected(self, flag: torch.Tensor, x, *args, **kwargs):
        """The norm with each of its tensors (parameters, statistics) taken from the twin where the traced flag
        is set. The two differ only in their tensors, so this is one norm, not a conditional of two: cheaper
        to trace, and it keeps the norm next to the layer before it in the exported graph."""
        twin = dict(itertools.chain(self.twin.named_parameters(), self.twin.named_buffers()))
        selected = {}
        for name, own in itertools.chain(self.named_parameters(), self.named_buffers()):
            other = twin.get(name)
            if other is not None and own.is_floating_point() and other.shape == own.shape:
                selected[name] = torch.where(flag, other, own)
        # Run as the plain norm (a Python flag) with the selected tensors in place of its own.
        token = ACTIVE_DEPTH.set({**(ACTIVE_DEPTH.get() or {}), self: False})
        try:
            return torch.func.functional_call(self, selected, (x, *args), kwargs)
        finally:
            ACTIVE_DEPTH.reset(token)

    def sync_twin(self) -> None:
        """Copy this norm's parameters and buffers into its twin (used after loading original weights)."""
        self.twin.load_state_dict({k: v for k, v in super().state_dict().items() if not k.startswith("twin.")})


class IdleWhenSkipped:
    """Mixin for a module inside a stage's shared blocks that is the identity while the stage skips its
    skippable part. Used for stochastic depth: the authors' shared Swin blocks drop no residual paths in
    a sub-network that skips their stage."""

    adn_skipped: bool = False

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        swap_in_subclass(module, cls, "IdleWhenSkipped")
        module.adn_skipped = False
        return module

    def forward(self, x, *args, **kwargs):
        return _identity_when_skipped(self, super().forward, x, *args, **kwargs)


class DepthStatisticsNorm:
    """Mixin for a batch norm with one row of running statistics per depth (``depth_running_mean`` and
    ``depth_running_var``, shape ``(2**num_stages, channels)``, non-persistent buffers: they follow
    ``.to()`` but stay out of ``state_dict``, so training code never sees them).

    In eval mode, inside the forward of a network that has them, ``running_mean`` and ``running_var``
    read as the row of the depth being run (:data:`STATISTICS_ROW`, per thread); the norm's own forward is
    unchanged, so subclasses that do more than normalize (timm's ``BatchNormAct2d``) keep doing it. In
    training mode, or called on its own, they are the plain running statistics. A skip-aware norm whose
    stage is skipped hands over to its twin, which has rows of its own."""

    @classmethod
    def convert(cls, norm: nn.Module, rows: int) -> nn.Module:
        """Give ``norm`` rows initialized to its running statistics (rows it already has are kept)."""
        if isinstance(norm, DepthStatisticsNorm):
            return norm
        swap_in_subclass(norm, cls, "PerDepth")
        for name in ("mean", "var"):
            current = norm._buffers[f"running_{name}"].detach()
            norm.register_buffer(f"depth_running_{name}", current.expand(rows, -1).clone(), persistent=False)
        return norm

    def __getattr__(self, name: str):
        # Buffers are not instance attributes: nn.Module.__getattr__ serves them, so this runs on every
        # read of running_mean / running_var (and of other buffers, parameters and submodules).
        rows = _ROWS.get(name)
        if rows is not None:
            row = STATISTICS_ROW.get()
            if isinstance(row, torch.Tensor) and not self.training:
                # A traced row: a gather in the exported program. Not ``table[row]``, which converts the
                # index to a Python int (an unbacked symbol that torch.cond's branch tracing rejects).
                return self._buffers[rows[0]].index_select(0, row.reshape(1)).squeeze(0)
            if row is not None and not self.training:
                # One view per row, made once: indexing the table on every read cost ~10 µs per norm.
                # Rebuilt when the table is another tensor (after .to(), .half(), loading).
                table, cached = self._buffers[rows[0]], self.__dict__.get(rows[1])
                if cached is None or cached[0] is not table:
                    cached = self.__dict__[rows[1]] = (table, table.unbind(0))
                return cached[1][row]
        return super().__getattr__(name)

    def __getstate__(self) -> dict:
        # The row views are rebuilt on demand; a copy of them would not follow later writes to the table.
        return {k: v for k, v in super().__getstate__().items() if k not in _ROW_VIEWS}

    def use_row(self, row: int | None) -> None:
        """Become a plain norm whose running statistics are (copies of) row ``row`` (for a standalone
        sub-network, which has one depth); ``None`` keeps the running statistics it has."""
        if row is not None:
            self._buffers["running_mean"] = self._buffers["depth_running_mean"][row].clone()
            self._buffers["running_var"] = self._buffers["depth_running_var"][row].clone()
        del self._buffers["depth_running_mean"], self._buffers["depth_running_var"]
        for views in _ROW_VIEWS:
            self.__dict__.pop(views, None)


_ROWS = {"running_mean": ("depth_running_mean", "adn_mean_rows"), "running_var": ("depth_running_var", "adn_var_rows")}
_ROW_VIEWS = {views for _, views in _ROWS.values()}


class SkippableStage:
    """One stage of an adaptive depth network (a plain controller, not an ``nn.Module``: the blocks
    stay where the original model put them).

    ``shared`` blocks always run; ``skippable`` blocks run unless ``skip`` is set; ``norms`` are the
    skip-aware norms that switch to their twins when ``skip`` is set; ``idle`` are modules of the shared
    blocks (:class:`IdleWhenSkipped`) that are the identity when ``skip`` is set."""

    def __init__(
        self,
        name: str,
        shared: Sequence[nn.Module],
        skippable: Sequence[nn.Module],
        norms: Sequence[nn.Module] = (),
        idle: Sequence[nn.Module] = (),
    ):
        if not shared:
            raise ValueError(f"stage {name!r}: at least one block must be shared (run by every sub-network)")
        self.name = name
        self.shared = list(shared)
        self.skippable = list(skippable)
        self.norms = list(norms)
        self.idle = list(idle)
        self._skip = False

    @property
    def skip(self) -> bool:
        """The stage's default flag (what ``net.skip = ...`` sets); a per-call depth overrides it."""
        return self._skip

    @skip.setter
    def skip(self, value: bool) -> None:
        value = bool(value)
        if value == self._skip:
            return
        for module in self.skippable:
            module.adn_skipped = value
        for module in self.norms + self.idle:
            module.adn_skipped = value
        self._skip = value

    def flags(self, value: bool) -> dict[nn.Module, bool]:
        """The per-module entries of :data:`ACTIVE_DEPTH` that run this stage with skip flag ``value``."""
        value = bool(value)
        return {module: value for module in self.skippable + self.norms + self.idle}

    @property
    def output_module(self) -> nn.Module:
        """The module whose output is the stage's output in every sub-network (a skipped last block
        returns its input, which is the output of the last block that ran)."""
        return (self.skippable or self.shared)[-1]

    def __repr__(self) -> str:
        return (
            f"SkippableStage({self.name!r}, shared={len(self.shared)}, skippable={len(self.skippable)}, "
            f"skip_aware_norms={len(self.norms)}, skip={self._skip})"
        )


MIXINS = (SkipAwareNorm, SkippableBlock, IdleWhenSkipped, DepthStatisticsNorm)

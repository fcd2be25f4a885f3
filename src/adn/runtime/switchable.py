"""One exported program for every depth: the depth is an input, not a choice made at export time.

``adn export --format onnx`` writes one file per depth: 2^N copies of the shared weights, 2^N sessions to
keep loaded. :func:`export_switchable_onnx` writes one ONNX file whose inputs are ``images`` (dynamic batch)
and ``skip``, a bool tensor of shape ``[N]`` (one flag per stage, True: that stage's skippable part is not
executed), and whose output is ``logits``. Every weight is stored once; each skip-aware norm and its twin
are both stored (they are different parameters), and so are the per-depth statistics tables of a network
that has them.

How: :class:`SwitchableNetwork` runs the network with each stage's flag taken from the ``skip`` tensor. The
skip machinery (:mod:`adn.layers`) sees tensor flags and chooses with ``torch.cond`` (the ``torch.export``
program, :func:`export_switchable_pt2`). For ONNX the network is traced once with every part run and each
choice marked, and the marks become ONNX ``If`` nodes in the exported graph (:mod:`adn.runtime.onnx_choice`;
tracing ``torch.cond`` branches made the export about twice as slow): a skipped block is not executed, as in a
per-depth file. A stage's skippable blocks share one conditional where they follow each other in an
``nn.Sequential`` (ResNet, MobileNetV2, ViT, Swin).
Two rewrites of the exported graph let ONNX Runtime optimize the branches as it does a per-depth file
(:func:`branch_local_weights`, :func:`branch_entry_pools`); they change no result. A network with per-depth
batch-norm statistics reads the row of its depth with a gather indexed by the flags (row = sum of flag_i
* 2^i, :attr:`adn.SkipConfig.index`).

Every depth is run in ONNX Runtime before the file is kept, at batch sizes 1 and 3, and compared with the
adaptive network in PyTorch (:data:`adn.runtime.graph_export.ONNX_TOLERANCE`, as for per-depth files).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.depth_statistics import rows_apply
from ..core.layers import ACTIVE_DEPTH, STATISTICS_ROW, TRACED_CHOICE, SkippedTogether, sequential_run
from ..core.network import AdaptiveDepthNetwork
from ..core.skip import SkipConfig
from ..utils.atomic import atomic_write
from .graph_export import ONNX_TOLERANCE, compare
from .onnx_choice import choices_to_if, traced_choice, translations

INPUT_NAMES = ["images", "skip"]
# At most this share of the weights is moved into If branches (see branch_local_weights).
BRANCH_WEIGHTS_BUDGET = 0.2
OUTPUT_NAMES = ["logits"]


class SwitchableNetwork(nn.Module):
    """``forward(images, skip)``: the adaptive network ``net`` at the depth given by the bool tensor ``skip``
    (shape ``[N]``). Meant to be traced (``torch.export``, ONNX); in eager mode ``net(images, skip=...)`` is
    the faster way to run a depth (plain Python flags, no conditionals)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if not isinstance(net, AdaptiveDepthNetwork):
            raise TypeError(f"expected a network converted with adn.convert, got {type(net).__name__}")
        self.net = net
        # Decided here, not in forward: rows_apply compares the weights' version counters with those the
        # rows were measured at, and the tensors that tracing substitutes for the weights have counters of
        # their own (it would mark the rows stale for good).
        self.per_depth_statistics = not net.training and rows_apply(net)
        # Each stage's skippable blocks in one conditional where they follow each other in a Sequential (the
        # first block runs them all; see SkippedTogether), else one conditional per block.
        modules = list(net.modules())
        self.together = [sequential_run(stage.skippable, modules) for stage in net.adn_stages]
        # Row of the per-depth statistics = sum of flag_i * 2^i (SkipConfig.index).
        self.register_buffer("row_weights", torch.tensor([1 << i for i in range(net.num_stages)]), persistent=False)

    def forward(self, images: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        net = self.net
        active = {}
        for index, stage in enumerate(net.adn_stages):
            flag = skip[index]
            active.update({module: flag for module in stage.skippable + stage.norms + stage.idle})
            if self.together[index]:
                together = SkippedTogether(flag, stage.skippable)
                active.update({block: together for block in stage.skippable})
        row = (skip.to(self.row_weights.dtype) * self.row_weights).sum() if self.per_depth_statistics else None
        depth_token = ACTIVE_DEPTH.set(active)
        row_token = STATISTICS_ROW.set(row)
        try:
            # The original model's forward, past AdaptiveDepthNetwork.forward: that one would set the
            # statistics row from the default depth (Python flags), not from ``skip``.
            return super(AdaptiveDepthNetwork, net).forward(images)
        finally:
            STATISTICS_ROW.reset(row_token)
            ACTIVE_DEPTH.reset(depth_token)


def _traced_example(example: torch.Tensor) -> torch.Tensor:
    # torch.export specializes a size of 1; trace at 2 to keep the batch dynamic.
    return example.expand(2, *example.shape[1:]).contiguous() if example.shape[0] == 1 else example


def export_switchable_program(net: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of :class:`SwitchableNetwork` (dynamic batch), inputs ``(images, skip)``."""
    switchable = SwitchableNetwork(net).eval()
    skip = torch.zeros(net.num_stages, dtype=torch.bool)
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(switchable, (_traced_example(example), skip), dynamic_shapes=({0: batch}, None))


def write_switchable_onnx(net: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> None:
    """Export ``net`` (in eval mode) as a switchable ONNX file at ``path``, unverified: see
    :func:`export_switchable_onnx`."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as error:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install 'adn[onnx]'") from error
    switchable = SwitchableNetwork(net).eval()
    skip = torch.zeros(net.num_stages, dtype=torch.bool)
    batch = torch.export.Dim("batch", min=1)
    # One flat trace with each choice marked, the marks made into If afterwards (adn.runtime.onnx_choice).
    choice_token = TRACED_CHOICE.set(traced_choice)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress; keep stdout for results
            program = torch.onnx.export(
                switchable,
                (_traced_example(example), skip),
                dynamo=True,
                dynamic_shapes=({0: batch}, None),
                input_names=INPUT_NAMES,
                output_names=OUTPUT_NAMES,
                custom_translation_table=translations(),
                verbose=False,
            )
    finally:
        TRACED_CHOICE.reset(choice_token)
    choices_to_if(program.model)
    graph = program.model.graph
    branch_entry_pools(graph, branch_local_weights(graph))
    # external_data=False: the weights inside the file, so that the file alone is the model.
    program.save(str(path), external_data=False)


def branch_local_weights(graph, budget: float = BRANCH_WEIGHTS_BUDGET) -> list:
    """Move the initializers of ``graph`` (an ``onnx_ir.Graph``) that only the nodes of one ``If`` branch read
    into that branch, branch by branch, those with the fewest bytes first, while the moved bytes stay within
    ``budget`` of all the weights; return the branches that got theirs. Same file, same weights, stored once.

    ONNX Runtime converts a convolution to its blocked layout (NCHWc) and fuses its activation only when the
    weights are initializers of the graph the convolution is in: with the skipped blocks' weights in the outer
    graph, their convolutions ran unfused, in the plain layout. But the session then holds about 2.7 bytes
    for each byte moved (the blocked copies), so only the branches with few weights for their work are worth
    it: those of the first stages, with small convolutions on large images. ResNet-50 (batch 1, super-net
    against its per-depth file): 1.15x nothing moved, 1.12x the first two stages' 2.5 MB, 1.09x the first
    three's 16 MB (memory 0.83x, 0.83x, 0.94x the per-depth session's), 1.08x everything (34 MB; 1.15x)."""
    total = sum(value.const_value.nbytes for value in graph.initializers.values() if value.const_value is not None)
    branches: dict = {}
    for value in graph.initializers.values():
        readers = {id(use.node.graph): use.node.graph for use in value.uses()}
        branch = next(iter(readers.values())) if len(readers) == 1 else None
        if branch is not None and branch is not graph and value not in graph.outputs and value.const_value is not None:
            branches.setdefault(id(branch), (branch, []))[1].append(value)
    moved, chosen = 0, []
    for branch, values in sorted(branches.values(), key=lambda entry: sum(v.const_value.nbytes for v in entry[1])):
        size = sum(value.const_value.nbytes for value in values)
        if moved + size > budget * total:
            break
        for value in values:
            graph.initializers.pop(value.name)
            branch.register_initializer(value)
        moved += size
        chosen.append(branch)
    return chosen


def branch_entry_pools(graph, branches) -> int:
    """In each of ``branches`` (``If`` branches of ``graph``, an ``onnx_ir.Graph``, that hold their weights:
    :func:`branch_local_weights`) that convolves an image-shaped (4-D) tensor of the outer graph, read that
    tensor through a ``MaxPool`` of kernel 1 (the identity), and return how many were inserted.

    ONNX Runtime computes convolutions in a blocked channel layout (NCHWc) and fuses a residual addition and
    activation into the convolution only when every input is in that layout; a tensor from outside the branch
    never is, so each block's addition and activation ran on their own, with layout conversions
    between (ResNet-50 super-net: 1.11x the per-depth file's time, 1.08x with the pools). A pool is one of the
    operators ONNX Runtime converts to the blocked layout, so everything after it in the branch stays there."""
    import onnx_ir as ir

    inserted = 0
    for branch in branches:
        read = {id(value): value for inner in branch for value in inner.inputs if value is not None}
        for value in read.values():
            producer = value.producer()
            if (producer.graph if producer is not None else value.graph) is branch:
                continue  # computed or stored in the branch
            if value.const_value is not None or value.shape is None or len(value.shape) != 4:
                continue
            uses = [use for use in value.uses() if use.node.graph is branch]
            if not any(use.node.op_type == "Conv" for use in uses):
                continue
            entry = ir.node("MaxPool", [value], {"kernel_shape": [1, 1]}, name=f"{value.name}_entry_{inserted}")
            entry.outputs[0].name = f"{value.name}_entry_{inserted}"
            entry.outputs[0].shape, entry.outputs[0].type = value.shape, value.type
            branch.insert_before(next(iter(branch)), entry)
            for use in uses:
                use.node.replace_input_with(use.idx, entry.outputs[0])
            inserted += 1
    return inserted


class SwitchableExportError(ValueError):
    """torch could not export the model as one switchable program (the exporter failed, not the checks)."""


def export_switchable_onnx(
    net: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    tolerance: float = ONNX_TOLERANCE,
    configs: Sequence | None = None,
) -> dict:
    """Write one ONNX file at ``path`` that runs ``net`` at every depth (inputs ``images``, ``skip``), verify
    the depths in ``configs`` (default: all 2^N) in ONNX Runtime (if installed) before it is kept, and return
    what was written: ``file``, ``bytes``, ``opset``, ``num_stages``, ``depths``, ``tolerance``, the largest
    difference from PyTorch, ``max_difference``, and each verified depth's, ``differences`` (``{"TFT": 3e-6}``;
    both None without ONNX Runtime). The network is exported in eval mode and left in the mode it was in.
    Raises :class:`SwitchableExportError` when torch's exporter fails on the model, ``ValueError`` when the
    file differs from the network (nothing is written then)."""
    path = Path(path)
    was_training = net.training
    net.eval()
    report: dict = {}

    def write(tmp: str) -> None:
        try:
            write_switchable_onnx(net, example, tmp)
        except ValueError:
            raise
        except Exception as error:  # the exporter's errors have no common base class
            raise SwitchableExportError(
                f"torch.onnx cannot export {type(net).__name__} as one switchable file: {_first_line(error)}"
            ) from error
        report["differences"] = switchable_differences(tmp, net, example, tolerance, configs=configs)
        report["opset"] = onnx_opset(tmp)

    try:
        atomic_write(path, write, suffix=".onnx")
    finally:
        net.train(was_training)
    differences = report["differences"]
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "opset": report["opset"],
        "num_stages": net.num_stages,
        "depths": 2**net.num_stages,
        "tolerance": tolerance,
        "differences": differences,
        "max_difference": max(differences.values()) if differences else None,
    }


def onnx_opset(path) -> int | None:
    """The default-domain opset of the ONNX file at ``path`` (None without the ``onnx`` package)."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def _first_line(error: BaseException) -> str:
    """The first line of ``error``, and of its innermost cause (where torch's exporters say what failed)."""

    def line(e: BaseException, most: int) -> str:
        lines = [text for text in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if text.strip()]
        text = lines[0] if lines else ""
        return f"{type(e).__name__}: {text if len(text) <= most else text[:most] + '...'}"

    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return line(error, 300) if root is error else f"{line(error, 120)} (caused by {line(root, 300)})"


def verify_switchable_onnx(
    path,
    net: nn.Module,
    example: torch.Tensor,
    tolerance: float = ONNX_TOLERANCE,
    batch_sizes=(1, 3),
    configs: Sequence | None = None,
) -> float | None:
    """Run the switchable ONNX file at every depth in ``configs`` (default: all 2^N) and each batch size on
    random images and compare with ``net(images, skip=depth)``; raise if any depth differs by more than
    ``tolerance`` or gives a NaN or infinite value. Returns the largest difference, or None when onnxruntime
    is not installed."""
    differences = switchable_differences(path, net, example, tolerance, batch_sizes, configs)
    return None if differences is None else max(differences.values())


def switchable_differences(
    path,
    net: nn.Module,
    example: torch.Tensor,
    tolerance: float = ONNX_TOLERANCE,
    batch_sizes=(1, 3),
    configs: Sequence | None = None,
) -> dict[str, float] | None:
    """:func:`verify_switchable_onnx`, returning each depth's largest difference: ``{"FFT": 2e-6, ...}``."""
    try:
        import onnxruntime
    except ImportError:
        return None
    configs = SkipConfig.all(net.num_stages) if configs is None else [SkipConfig(c, net.num_stages) for c in configs]
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # not its notes on initializers the exporter left unused
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = {str(config): 0.0 for config in configs}
    for batch in batch_sizes:
        images = torch.randn(batch, *example.shape[1:], generator=generator)
        for config in configs:
            with torch.no_grad():
                expected = net(images, skip=config).numpy()
            got = session.run(None, {"images": images.numpy(), "skip": np.array(config, dtype=bool)})[0]
            worst[str(config)] = max(
                worst[str(config)],
                compare(
                    expected, got, tolerance, path, f"depth {config}, batch {batch} of random images", "ONNX Runtime"
                ),
            )
    return worst


def export_switchable_pt2(
    net: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    tolerance: float = ONNX_TOLERANCE,
    configs: Sequence | None = None,
) -> dict:
    """Write one ``torch.export`` program at ``path`` (inputs ``images``, ``skip``; every depth via
    ``torch.cond``), load it back and check the depths in ``configs`` (default: all 2^N) against ``net`` at
    batch sizes 1 and 3 before it is kept. Returns ``file``, ``bytes``, ``depths``, ``tolerance``,
    ``differences`` and ``max_difference``. Raises :class:`SwitchableExportError` when torch cannot export,
    save or load the program (Swin, in torch 2.14: see docs/evaluation.md; its ONNX file exports)."""
    path = Path(path)
    configs = SkipConfig.all(net.num_stages) if configs is None else [SkipConfig(c, net.num_stages) for c in configs]
    was_training = net.training
    net.eval()
    worst = {str(config): 0.0 for config in configs}

    def write(tmp: str) -> None:
        step = "export"
        try:
            program = export_switchable_program(net, example)
            step = "save"
            torch.export.save(program, tmp)
            step = "load"
            module = torch.export.load(tmp).module()
        except Exception as error:  # the exporter's errors have no common base class
            raise SwitchableExportError(
                f"torch.export cannot {step} {type(net).__name__} as one switchable program: {_first_line(error)}"
            ) from error
        generator = torch.Generator().manual_seed(0)
        for batch in (1, 3):
            images = torch.randn(batch, *example.shape[1:], generator=generator)
            for config in configs:
                with torch.no_grad():
                    expected = net(images, skip=config).numpy()
                    got = module(images, torch.tensor(list(config), dtype=torch.bool)).numpy()
                worst[str(config)] = max(
                    worst[str(config)],
                    compare(
                        expected,
                        got,
                        tolerance,
                        path,
                        f"depth {config}, batch {batch} of random images",
                        "the torch.export program",
                    ),
                )

    try:
        atomic_write(path, write, suffix=".pt2")
    finally:
        net.train(was_training)
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "num_stages": net.num_stages,
        "depths": 2**net.num_stages,
        "tolerance": tolerance,
        "differences": worst,
        "max_difference": max(worst.values()),
    }

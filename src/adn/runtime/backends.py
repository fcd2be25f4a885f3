"""Running sub-networks on other execution engines: ``torch.compile`` and ONNX Runtime.

Both compile a *fixed* graph, so a depth is a different program. Rather than letting a depth switch
trigger a compilation on the hot path, every requested depth is prepared ahead of time:

    fast = adn.compile_depths(net, example)     # compiles all 2^N sub-networks now
    fast.skip = "TTF"                           # switching is a dictionary lookup
    fast(images)

:func:`depth_runners` gives the per-depth callables ``adn profile --backend`` times.

ONNX Runtime is the exception: one switchable file holds every depth (:mod:`adn.runtime.switchable`), so
:func:`onnx_depths` opens one session and switching depth is feeding another ``skip`` input
(:class:`OnnxSwitchable`); :class:`OnnxDepths` keeps one session per depth (per-depth files fold every
batch norm into its convolution, so each depth is a little faster, at 2^N times the memory).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.skip import SkipConfig
from .graph_export import export_onnx
from .switchable import SwitchableExportError, export_switchable_onnx

# "onnxruntime": one switchable ONNX file in one session for every depth (skip fed as an input), or, for a
# model torch cannot export so, one session per depth; "onnxruntime-per-depth": one session per depth always.
ONNX_BACKENDS = ("onnxruntime", "onnxruntime-per-depth")
BACKENDS = ("eager", "compile", *ONNX_BACKENDS)
COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests switch to dynamo's fast "eager" backend


class CompiledDepths:
    """Sub-networks of an adaptive depth network, each compiled with ``torch.compile`` ahead of time.

    For inference: the compiled modules share their weights with ``net`` and run under
    ``torch.inference_mode``. ``skip`` selects the depth used by ``__call__``; switching never
    compiles, and asking for a depth that was not prepared is an error instead of a silent
    compilation. Graphs are specialised to the example's shape (as ``torch.compile`` does by
    default): a new batch size compiles once more unless ``dynamic=True``."""

    def __init__(
        self,
        net: nn.Module,
        example: torch.Tensor,
        configs: Sequence | None = None,
        backend: str | None = None,
        mode: str | None = None,
        dynamic: bool | None = None,
    ):
        backend = backend or COMPILE_BACKEND
        self.num_stages = net.num_stages
        configs = net.sub_networks() if configs is None else [SkipConfig(c, net.num_stages) for c in configs]
        self.compile_seconds: dict[str, float] = {}
        self._modules: dict[str, Callable] = {}
        for config in configs:
            start = time.perf_counter()
            compiled = torch.compile(net.subnet(config).eval(), backend=backend, mode=mode, dynamic=dynamic)
            with torch.inference_mode():
                compiled(example)  # compile now, not at the first real call
            self._modules[str(config)] = compiled
            self.compile_seconds[str(config)] = time.perf_counter() - start
        self._skip = str(net.skip) if str(net.skip) in self._modules else str(configs[0])

    @property
    def configs(self) -> list[SkipConfig]:
        return [SkipConfig(c) for c in self._modules]

    @property
    def skip(self) -> SkipConfig:
        return SkipConfig(self._skip)

    @skip.setter
    def skip(self, value) -> None:
        key = str(SkipConfig(value, self.num_stages))
        if key not in self._modules:
            raise ValueError(
                f"sub-network {key} was not compiled; compiled: {', '.join(self._modules)}. "
                "Pass it in configs= to compile_depths"
            )
        self._skip = key

    def __call__(self, x: torch.Tensor, skip=None) -> torch.Tensor:
        key = self._skip
        if skip is not None:
            key = str(SkipConfig(skip, self.num_stages))
            if key not in self._modules:
                raise ValueError(f"sub-network {key} was not compiled; compiled: {', '.join(self._modules)}")
        # Always inference mode: the graphs were compiled under it, and a change of grad mode would
        # fail dynamo's guards and recompile on the hot path.
        with torch.inference_mode():
            return self._modules[key](x)


def compile_depths(
    net: nn.Module,
    example: torch.Tensor,
    configs: Sequence | None = None,
    backend: str | None = None,
    mode: str | None = None,
    dynamic: bool | None = None,
) -> CompiledDepths:
    """Compile every sub-network in ``configs`` (default: all 2^N) ahead of time; see :class:`CompiledDepths`.
    ``backend``, ``mode`` and ``dynamic`` are passed to ``torch.compile``."""
    return CompiledDepths(net, example, configs, backend=backend, mode=mode, dynamic=dynamic)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise ValueError("the onnxruntime backend needs ONNX Runtime: pip install 'adn[onnx]'") from error
    return onnxruntime


def session_options(threads: int | None = None):
    """ONNX Runtime session options with ``threads`` intra-op threads (default: as many as torch uses, so that
    eager and ONNX Runtime timings compare like with like), one inter-op thread, warnings only."""
    options = _onnxruntime().SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def _on_cpu(example: torch.Tensor) -> None:
    if example.device.type != "cpu":
        raise ValueError(
            "the onnxruntime backend runs on the CPU (the pinned onnxruntime package has no GPU "
            "provider); use --device cpu"
        )


class OnnxSwitchable:
    """One ONNX Runtime session on a switchable ONNX file (inputs ``images`` and ``skip``): every depth,
    chosen per call by the ``skip`` input; switching depth creates nothing. Opens ``path`` when given (a file
    written by ``adn export --switchable``, with ``num_stages`` flags), else exports ``net`` to a temporary
    file, checks the depths in ``configs`` against it (:func:`adn.runtime.switchable.export_switchable_onnx`)
    and opens that."""

    layout = "switchable"

    def __init__(
        self,
        net: nn.Module | None = None,
        example: torch.Tensor | None = None,
        configs: Sequence | None = None,
        threads: int | None = None,
        path: str | os.PathLike | None = None,
        num_stages: int | None = None,
    ):
        onnxruntime = _onnxruntime()
        options = session_options(threads)
        self.threads = options.intra_op_num_threads
        if path is None:
            _on_cpu(example)
            self.num_stages = net.num_stages
            with tempfile.TemporaryDirectory(prefix="adn-onnx-") as folder:
                file = Path(folder) / "switchable.onnx"
                with contextlib.redirect_stderr(io.StringIO()):
                    self.report = export_switchable_onnx(net, example[:1], file, configs=configs)
                self.session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        else:
            self.report = None
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            names = [i.name for i in self.session.get_inputs()]
            if names != ["images", "skip"]:
                raise ValueError(
                    f"{path} is not a switchable file (inputs {', '.join(names)}; expected images, skip): "
                    f"write one with adn export --format onnx --switchable"
                )
            flags = self.session.get_inputs()[1].shape[0]
            if num_stages is not None and flags != num_stages:
                raise ValueError(
                    f"{path} takes {flags} skip flags, not {num_stages}: its manifest was altered or "
                    f"belongs to another export"
                )
            self.num_stages = flags
        self._flags: dict[str, object] = {}

    def runner(self, config) -> Callable[[object], object]:
        config = SkipConfig(config, self.num_stages)
        flags = self._flags.setdefault(str(config), np.array(list(config), dtype=bool))
        session = self.session
        return lambda array: session.run(None, {"images": array, "skip": flags})


class OnnxDepths:
    """Sub-networks exported to ONNX (dynamic batch) and loaded in ONNX Runtime sessions on the CPU (one
    per depth), with as many threads as torch uses, so that eager and ONNX Runtime timings compare like
    with like."""

    layout = "per-depth"

    def __init__(
        self,
        net: nn.Module,
        example: torch.Tensor,
        configs: Sequence | None = None,
        folder: str | os.PathLike | None = None,
        threads: int | None = None,
    ):
        onnxruntime = _onnxruntime()
        _on_cpu(example)
        configs = net.sub_networks() if configs is None else [SkipConfig(c, net.num_stages) for c in configs]
        options = session_options(threads)
        self.threads = options.intra_op_num_threads
        self.sessions = {}
        with contextlib.ExitStack() as stack:
            if folder is None:
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="adn-onnx-"))
            for config in configs:
                path = Path(folder) / f"subnet_{config}.onnx"
                with contextlib.redirect_stderr(io.StringIO()):
                    export_onnx(net.subnet(config).eval(), example[:1], str(path))
                self.sessions[str(config)] = onnxruntime.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"]
                )

    def runner(self, config) -> Callable[[torch.Tensor], object]:
        session = self.sessions[str(config)]
        name = session.get_inputs()[0].name
        return lambda array: session.run(None, {name: array})


def onnx_depths(
    net: nn.Module,
    example: torch.Tensor,
    configs: Sequence | None = None,
    backend: str = "onnxruntime",
    threads: int | None = None,
) -> OnnxSwitchable | OnnxDepths:
    """ONNX Runtime sessions for the depths in ``configs``: on ``"onnxruntime"`` one switchable session
    (:class:`OnnxSwitchable`), or, when torch cannot export the model as one switchable file, one session per
    depth with a warning on stderr; on ``"onnxruntime-per-depth"`` one session per depth
    (:class:`OnnxDepths`)."""
    if backend not in ONNX_BACKENDS:
        raise ValueError(f"unknown ONNX Runtime backend {backend!r}; choose one of {', '.join(ONNX_BACKENDS)}")
    if backend == "onnxruntime":
        try:
            return OnnxSwitchable(net, example, configs, threads=threads)
        except SwitchableExportError as error:
            print(
                f"adn: warning: {error}; using one ONNX Runtime session per depth instead (more memory; "
                f"--backend onnxruntime-per-depth says so and skips this attempt)",
                file=sys.stderr,
            )
    return OnnxDepths(net, example, configs, threads=threads)


def depth_runners(net: nn.Module, example: torch.Tensor, configs: Sequence, backend: str = "eager"):
    """For each config, a callable that runs one forward pass at that depth on ``backend``, and the
    input it takes (a tensor, or a NumPy array for ONNX Runtime). Preparation (compilation, export)
    happens here, not in the timed calls."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    configs = [SkipConfig(c, net.num_stages) for c in configs]
    if backend == "eager":

        def eager(config):
            def run(x):
                with net.skipping(config):
                    return net(x)

            return run

        return [eager(c) for c in configs], example
    if backend == "compile":
        compiled = compile_depths(net, example, configs)
        return [(lambda x, key=c: compiled(x, skip=key)) for c in configs], example
    onnx = onnx_depths(net, example, configs, backend)
    return [onnx.runner(c) for c in configs], example.numpy()

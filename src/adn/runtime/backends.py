"""Running sub-networks on other execution engines: ``torch.compile`` and ONNX Runtime.

Both compile a *fixed* graph, so a depth is a different program. Rather than letting a depth switch
trigger a compilation on the hot path, every requested depth is prepared ahead of time:

    fast = adn.compile_depths(net, example)     # compiles all 2^N sub-networks now
    fast.skip = "TTF"                           # switching is a dictionary lookup
    fast(images)

:func:`depth_runners` gives the per-depth callables ``adn profile --backend`` times.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.skip import SkipConfig
from .graph_export import export_onnx

BACKENDS = ("eager", "compile", "onnxruntime")
COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests switch to dynamo's fast "eager" backend


class CompiledDepths:
    """Sub-networks of an adaptive depth network, each compiled with ``torch.compile`` ahead of time.

    For inference: the compiled modules share their weights with ``net`` and run under
    ``torch.inference_mode``. ``skip`` selects the depth used by ``__call__``; switching never
    compiles, and asking for a depth that was not prepared is an error instead of a silent
    compilation. Graphs are specialised to the example's shape (as ``torch.compile`` does by
    default): a new batch size compiles once more unless ``dynamic=True``."""

    def __init__(self, net: nn.Module, example: torch.Tensor, configs: Sequence | None = None,
                 backend: str | None = None, mode: str | None = None, dynamic: bool | None = None):
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
            raise ValueError(f"sub-network {key} was not compiled; compiled: {', '.join(self._modules)}. "
                             "Pass it in configs= to compile_depths")
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


def compile_depths(net: nn.Module, example: torch.Tensor, configs: Sequence | None = None,
                   backend: str | None = None, mode: str | None = None, dynamic: bool | None = None) -> CompiledDepths:
    """Compile every sub-network in ``configs`` (default: all 2^N) ahead of time; see :class:`CompiledDepths`.
    ``backend``, ``mode`` and ``dynamic`` are passed to ``torch.compile``."""
    return CompiledDepths(net, example, configs, backend=backend, mode=mode, dynamic=dynamic)


class OnnxDepths:
    """Sub-networks exported to ONNX (dynamic batch) and loaded in ONNX Runtime sessions on the CPU,
    with as many threads as torch uses, so that eager and ONNX Runtime timings compare like with like."""

    def __init__(self, net: nn.Module, example: torch.Tensor, configs: Sequence | None = None,
                 folder: str | os.PathLike | None = None, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError as error:
            raise ValueError("the onnxruntime backend needs ONNX Runtime: pip install 'adn[onnx]'") from error
        if example.device.type != "cpu":
            raise ValueError("the onnxruntime backend runs on the CPU (the pinned onnxruntime package has no GPU "
                             "provider); use --device cpu")
        configs = net.sub_networks() if configs is None else [SkipConfig(c, net.num_stages) for c in configs]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
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
                    str(path), options, providers=["CPUExecutionProvider"])

    def runner(self, config) -> Callable[[torch.Tensor], object]:
        session = self.sessions[str(config)]
        name = session.get_inputs()[0].name
        return lambda array: session.run(None, {name: array})


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
    onnx = OnnxDepths(net, example, configs)
    return [onnx.runner(c) for c in configs], example.numpy()

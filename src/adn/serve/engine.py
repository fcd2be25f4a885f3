"""Running a batch at a depth, on eager PyTorch or ONNX Runtime, with every depth prepared before the
first request: switching depth between batches never exports, compiles or creates a session.

Eager PyTorch switches depth per call (``net(x, skip=...)``: flags, nothing rebuilt). ONNX Runtime gets
one session per depth, exported and loaded at start-up (:class:`adn.runtime.backends.OnnxDepths`).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..runtime.backends import OnnxDepths
from ..core.skip import SkipConfig

BACKENDS = ("eager", "onnxruntime")


class Engine:
    def __init__(self, net: nn.Module, example: torch.Tensor, configs: list | None = None, backend: str = "eager"):
        """``example``: one input ``[1, C, H, W]``; ``configs``: the depths to prepare (default: all 2^N)."""
        if backend not in BACKENDS:
            raise ValueError(f"--backend {backend}: adn serve runs on {' or '.join(BACKENDS)} (a compiled graph is "
                             f"specialised to one batch size, and batch sizes vary here)")
        self.backend = backend
        self.num_stages = net.num_stages
        configs = net.sub_networks() if configs is None else [SkipConfig(c, net.num_stages) for c in configs]
        start = time.perf_counter()
        if backend == "eager":
            net.eval()
            self._runners = {str(c): self._eager(net, c) for c in configs}
        else:
            sessions = OnnxDepths(net, example, configs)
            self._runners = {str(c): self._onnx(sessions, c) for c in configs}
        for run in self._runners.values():  # a first call is slow (allocation, session set-up): not on a request
            run(example)
        self.prepare_seconds = time.perf_counter() - start

    @property
    def skips(self) -> list[str]:
        return list(self._runners)

    def __call__(self, batch: torch.Tensor, skip: str) -> torch.Tensor:
        """The logits of ``batch`` at depth ``skip`` (a prepared one, as "TTF")."""
        run = self._runners.get(skip)
        if run is None:
            raise ValueError(f"depth {skip} was not prepared; prepared: {', '.join(self._runners)}")
        return run(batch)

    @staticmethod
    def _eager(net: nn.Module, config: SkipConfig):
        def run(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return net(batch, skip=config)
        return run

    @staticmethod
    def _onnx(sessions: OnnxDepths, config: SkipConfig):
        runner = sessions.runner(config)

        def run(batch: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(runner(batch.contiguous().numpy())[0])
        return run

"""Running a batch at a depth, on eager PyTorch or ONNX Runtime, with every depth prepared before the
first request: switching depth between batches never exports, compiles or creates a session.

Eager PyTorch switches depth per call (``net(x, skip=...)``: flags, nothing rebuilt). ONNX Runtime gets one
session on one switchable file, exported and loaded at start-up, fed each batch's depth as its ``skip`` input
(:class:`adn.runtime.backends.OnnxSwitchable`); with ``onnxruntime-per-depth`` (or for a model torch cannot
export as one switchable file) one session per depth (:class:`adn.runtime.backends.OnnxDepths`).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from ..core.skip import SkipConfig
from ..runtime.backends import ONNX_BACKENDS, OnnxDepths, OnnxSwitchable, onnx_depths

BACKENDS = ("eager", *ONNX_BACKENDS)


class Engine:
    def __init__(
        self,
        net: nn.Module | None,
        example: torch.Tensor,
        configs: list | None = None,
        backend: str = "eager",
        switchable_file: str | os.PathLike | None = None,
        num_stages: int | None = None,
    ):
        """``example``: one input ``[1, C, H, W]``; ``configs``: the depths to prepare (default: all 2^N). Without
        ``net``: the switchable ONNX file ``switchable_file`` (written, and checked at every depth, by ``adn
        export --switchable``) of a network of ``num_stages`` stages, on onnxruntime."""
        if backend not in BACKENDS:
            raise ValueError(
                f"--backend {backend}: adn serve runs on {' or '.join(BACKENDS)} (a compiled graph is "
                f"specialised to one batch size, and batch sizes vary here)"
            )
        if net is None and backend != "onnxruntime":
            raise ValueError(
                f"--backend {backend}: an exported switchable file runs on onnxruntime only; serving on "
                f"{backend} needs the checkpoint (--checkpoint)"
            )
        self.backend = backend
        self.num_stages = net.num_stages if net is not None else num_stages
        configs = (
            SkipConfig.all(self.num_stages) if configs is None else [SkipConfig(c, self.num_stages) for c in configs]
        )
        start = time.perf_counter()
        if net is None:
            sessions = OnnxSwitchable(path=switchable_file, num_stages=num_stages)
            self._runners = {str(c): self._onnx(sessions, c) for c in configs}
            self.layout = sessions.layout
        elif backend == "eager":
            net.eval()
            self._runners = {str(c): self._eager(net, c) for c in configs}
            self.layout = "eager"
        else:
            sessions = onnx_depths(net, example, configs, backend)
            self._runners = {str(c): self._onnx(sessions, c) for c in configs}
            self.layout = sessions.layout  # "switchable" or "per-depth"
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
    def _onnx(sessions: OnnxSwitchable | OnnxDepths, config: SkipConfig):
        runner = sessions.runner(config)

        def run(batch: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(runner(batch.contiguous().numpy())[0])

        return run

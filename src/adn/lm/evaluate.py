"""Measuring an adaptive depth language model: perplexity of each sub-network on held-out text, the same for
naive layer removal, and decoding speed per depth.

Perplexity: the held-out token stream is cut into non-overlapping windows of ``seq_len`` tokens; every
token of a window but the first is predicted from the tokens before it in that window; perplexity =
exp(mean negative log-likelihood). All depths read the same windows, so their numbers compare pairwise.

Naive removal: the original model with the same layers dropped. A freshly converted model is exactly that
in every sub-network (skip-aware twins start as copies of their norms; tests/test_lm.py checks it against
physically removed layers), so naive perplexities come from the original weights converted anew.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.skip import SkipConfig
from .generate import greedy_generate, open_stream


@torch.no_grad()
def perplexity(
    net, windows: torch.Tensor, skip="super", batch_size: int = 2, autocast=None, engine: bool = False
) -> float:
    """Perplexity of sub-network ``skip`` over ``windows`` ([count, seq_len] token ids), computed by the
    model's forward or, with ``engine``, by the decoding engine (:mod:`adn.lm.engine`: to check its numerics)."""
    depth = SkipConfig(skip, num_stages=net.num_stages)
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        if engine:
            stream = open_stream(net, depth, batch.shape[1], batch.shape[0], engine=True)
            logits = stream.logits(stream.hidden(batch, keep=batch.shape[1]))
        else:
            with autocast() if autocast else contextlib.nullcontext():
                logits = net(input_ids=batch, use_cache=False, skip=depth).logits
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def perplexity_table(
    net,
    windows: torch.Tensor,
    configs: list[SkipConfig],
    batch_size: int = 2,
    autocast=None,
    label: str = "perplexity",
    progress: bool = True,
) -> dict[str, float]:
    """``{skip string: perplexity}`` for every config, with a progress bar on stderr."""
    results = {}
    for config in tqdm(configs, desc=label, unit="depth", file=sys.stderr, disable=not progress, leave=False):
        results[str(config)] = perplexity(net, windows, config, batch_size, autocast)
    return results


def decoding_speed(
    net, prompt: torch.Tensor, new_tokens: int, skip, repeats: int = 1, engine: bool | None = None
) -> float:
    """Decode tokens/s of greedy decoding with a KV cache at depth ``skip`` (the prefill not counted),
    the best of ``repeats`` runs after one untimed warm-up; ``engine`` as for :func:`greedy_generate`."""
    greedy_generate(net, prompt, min(new_tokens, 4), skip=skip, engine=engine)
    best = 0.0
    for _ in range(repeats):
        _, stats = greedy_generate(net, prompt, new_tokens, skip=skip, return_stats=True, engine=engine)
        best = max(best, stats.decode_tokens_per_second)
    return best

"""Greedy decoding at one depth, and self-speculative decoding: a shallow sub-network of the same network
drafts tokens, the deep one verifies them all in one forward pass.

Self-speculative greedy decoding (batch of one prompt):

1. the draft depth (default: the base-net) proposes ``k`` tokens, one cheap forward pass each;
2. the target depth (default: the super-net) runs once over the last accepted token and the ``k`` drafts,
   which gives its own greedy choice after every prefix;
3. drafts are accepted while they equal the target's choice; the first disagreement is replaced by the
   target's token (all accepted: the target's next token comes free). Both caches drop what was rejected.

A draft may also use a restricted output head (:class:`DraftHead`, as FR-Spec does): the rows of the output
projection for the ``K`` tokens most frequent in a corpus (:func:`frequent_tokens`), so a draft pass skips
most of the 49,152 x 576 projection SmolLM2 runs at every depth. The draft can then only propose those
tokens; the target keeps the full head, so the output does not change.

Drafts may also come from the context (``lookup=n``, prompt lookup): the tokens that followed an earlier
occurrence of the last ``n`` tokens, at no forward pass (:func:`lookup_draft`).

Every emitted token is the target's greedy choice given the tokens before it, so the output equals plain
greedy decoding at the target depth (up to float rounding between one-token and many-token passes, which
can only matter where two logits tie). The two depths keep separate caches: their shared layers compute
different keys and values.

Both loops decode through a *stream* at one depth (:func:`open_stream`): the decoding engine's
(:class:`adn.lm.engine.DepthStream`: merged projections, a static KV cache, packed bfloat16 weights) where
it runs the model, else the model's own forward with a :class:`adn.lm.cache.DepthCache`
(:class:`ForwardStream`). Both pick the same tokens (tests/test_lm_engine.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..core.skip import SkipConfig
from .cache import DepthCache
from .engine import FEW_TOKENS, engine_for, unsupported_reason
from .matvec import Projection


def _check_prompt(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be [batch, tokens] with at least one token, got shape {tuple(input_ids.shape)}"
        )
    return input_ids


class DraftHead:
    """The output head restricted to ``token_ids`` (a 1-D tensor of distinct vocabulary ids): a draft pass
    runs the decoder at its depth, then scores only those tokens. Holds a copy of the head's rows for them
    (contiguous, in the head's dtype): K x hidden instead of vocabulary x hidden."""

    def __init__(self, net, token_ids: torch.Tensor):
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        head = net.get_output_embeddings()
        vocab = head.weight.shape[0]
        if token_ids.numel() == 0 or int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab:
            raise ValueError(
                f"draft vocabulary: give 1 to {vocab} token ids in [0, {vocab}), got {token_ids.numel()} ids"
            )
        if token_ids.unique().numel() != token_ids.numel():
            raise ValueError("draft vocabulary: token ids must be distinct")
        if getattr(head, "bias", None) is not None:
            raise ValueError("draft vocabulary: output heads with a bias are not supported")
        self.token_ids = token_ids
        self.weight = head.weight.detach()[token_ids].contiguous()
        self.projection = Projection(self.weight)

    def __len__(self) -> int:
        return self.token_ids.numel()

    def next_token(self, stream, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` to ``stream`` (a :func:`open_stream`); the draft's greedy choice ([batch, 1])
        among the head's tokens."""
        return draft_next(stream, tokens, self)[0]


def draft_next(stream, tokens: torch.Tensor, head: DraftHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed ``tokens`` to a draft's ``stream``; its greedy choice ([batch, 1]), among ``head``'s tokens if given,
    and the scores it chose from ([batch, vocabulary or K])."""
    scores = stream.logits(stream.hidden(tokens)[:, -1], head.projection if head is not None else None)
    best = scores.argmax(-1)
    return (best if head is None else head.token_ids[best])[:, None], scores


def frequent_tokens(stream: torch.Tensor, count: int, vocab_size: int) -> torch.Tensor:
    """The ``count`` most frequent token ids of a token stream (ties: the lower id), for :class:`DraftHead`."""
    if not 1 <= count <= vocab_size:
        raise ValueError(f"count must be between 1 and the vocabulary's {vocab_size}, got {count}")
    counts = torch.bincount(stream.flatten().long(), minlength=vocab_size)[:vocab_size]
    order = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))[:count]
    return torch.tensor(sorted(order), dtype=torch.long)


class ForwardStream:
    """Decoding at one depth through the model's own forward and a :class:`DepthCache`: what runs any
    model ``transformers`` runs. The same interface as :class:`adn.lm.engine.DepthStream`."""

    is_engine = False

    def __init__(self, net, depth: SkipConfig):
        self.net, self.depth, self.cache = net, depth, DepthCache(net)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def hidden(self, tokens: torch.Tensor, keep: int = 1) -> torch.Tensor:
        with self.net.skipping(self.depth):
            out = self.net.model(input_ids=tokens, past_key_values=self.cache, use_cache=True)
        return out.last_hidden_state[:, -keep:]

    def logits(self, hidden: torch.Tensor, head: Projection | None = None) -> torch.Tensor:
        return head(hidden) if head is not None else self.net.lm_head(hidden)

    def keep(self, length: int) -> None:
        self.cache.keep(length)


ENGINE_CHOICES = {"auto": None, "on": True, "off": False}  # the --engine flags, as ``engine=`` takes them


def engine_decodes(net, capacity: int, engine: bool | None = None) -> bool:
    """Whether :func:`open_stream` decodes ``net`` with the engine: ``engine=True`` requires it (a ValueError
    says why it cannot), ``False`` refuses it, None uses it where it runs the model."""
    if engine is False:
        return False
    reason = unsupported_reason(net, capacity)
    if reason is not None and engine:
        raise ValueError(f"the decoding engine cannot run this model: {reason}")
    return reason is None


def open_stream(net, depth, capacity: int, batch: int = 1, engine: bool | None = None):
    """A decoding stream at ``depth`` for ``batch`` sequences of up to ``capacity`` tokens: the decoding
    engine (:mod:`adn.lm.engine`) where :func:`engine_decodes`, else the model's own forward
    (:class:`ForwardStream`)."""
    depth = SkipConfig(depth, num_stages=net.num_stages)
    if engine_decodes(net, capacity, engine):
        return engine_for(net, capacity).stream(depth, capacity, batch)
    return ForwardStream(net, depth)


def _greedy_next(stream, tokens: torch.Tensor, keep: int = 1) -> torch.Tensor:
    """Feed ``tokens`` (the ones the stream has not seen); the greedy choice after each of the last ``keep``."""
    return stream.logits(stream.hidden(tokens, keep)).argmax(-1)


@dataclass
class GreedyStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    engine: bool = False  # decoded by adn.lm.engine (else by the model's own forward)

    @property
    def decode_tokens_per_second(self) -> float:
        # The first new token comes from the prefill pass; the decode loop makes the rest.
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


@torch.no_grad()
def greedy_generate(
    net,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    skip="super",
    eos_token_id: int | None = None,
    return_stats: bool = False,
    on_token: Callable[[torch.Tensor], object] | None = None,
    engine: bool | None = None,
):
    """Greedy decoding at depth ``skip`` with a KV cache; returns the prompt followed by the new tokens
    (and :class:`GreedyStats` with ``return_stats``). Stops early when every row has produced ``eos_token_id``.
    ``on_token`` is called with each new token (``[batch, 1]``) as soon as it is chosen (streaming).
    ``engine``: decode with :mod:`adn.lm.engine` (None: where it runs the model; see :func:`open_stream`)."""
    input_ids = _check_prompt(input_ids)
    stream = open_stream(net, skip, input_ids.shape[1] + max_new_tokens, input_ids.shape[0], engine)
    start = time.perf_counter()
    token = _greedy_next(stream, input_ids)
    prefill = time.perf_counter() - start
    tokens, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    start = time.perf_counter()
    for step in range(max_new_tokens):
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if eos_token_id is not None:
            done |= token[:, 0] == eos_token_id
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            token = _greedy_next(stream, token)
    decode = time.perf_counter() - start
    output = torch.cat([input_ids, *tokens], dim=1)
    if return_stats:
        return output, GreedyStats(input_ids.shape[1], len(tokens), prefill, decode, stream.is_engine)
    return output


@dataclass
class SpeculativeStats:
    draft: str
    target: str
    draft_tokens: int  # k: tokens drafted per round (at most)
    new_tokens: int
    drafted: int  # draft tokens proposed in all
    accepted: int  # of which the target agreed with
    target_passes: int  # forward passes of the target depth, the prefill included
    draft_passes: int
    seconds: float
    draft_vocab: int | None = None  # tokens the draft's head scores (None: the full vocabulary)
    engine: bool = False  # decoded by adn.lm.engine (else by the model's own forward)
    min_confidence: float = 0.0  # adaptive draft length: a round stops drafting below this probability
    lookup: int = 0  # context drafts: n-gram length matched in the tokens so far (0: none)
    lookup_drafted: int = 0  # of ``drafted``, tokens the context proposed
    lookup_accepted: int = 0  # of ``accepted``, context tokens the target agreed with

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_target_pass(self) -> float:
        return self.new_tokens / self.target_passes if self.target_passes else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_target_pass": self.tokens_per_target_pass,
            "tokens_per_second": self.tokens_per_second,
        }


@torch.no_grad()
def lookup_draft(sequence: torch.Tensor, ngram: int, count: int) -> torch.Tensor | None:
    """Up to ``count`` tokens that followed the latest earlier occurrence of the last ``ngram`` tokens of
    ``sequence`` ([1, length]) in it, as [1, <= count]; None when they occur nowhere earlier. Text repeats
    itself (names, code, phrases from the prompt): such a draft costs no forward pass (prompt lookup)."""
    tokens = sequence[0]
    if tokens.numel() <= ngram:
        return None
    earlier = tokens[:-1].unfold(0, ngram, 1)  # every n-gram that has a token after it
    found = (earlier == tokens[-ngram:]).all(dim=1).nonzero()
    if found.numel() == 0:
        return None
    start = int(found[-1]) + ngram
    return tokens[start : start + count][None]


def _draft_round(stream, sequence: torch.Tensor, k: int, head, min_confidence: float, stats) -> torch.Tensor:
    """The draft depth's proposal for one round ([1, <= k]): one pass per token, stopping early below
    ``min_confidence``."""
    drafts = []
    pending = sequence[:, stream.length :]  # tokens the draft has not seen (>= 1)
    for i in range(k):
        token, scores = draft_next(stream, pending, head)
        stats.draft_passes += 1
        drafts.append(token)
        pending = token
        if min_confidence and i + 1 < k and float(scores.float().softmax(-1).max()) < min_confidence:
            break
    return torch.cat(drafts, dim=1)


def speculative_generate(
    net,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    draft="base",
    target="super",
    draft_tokens: int = 4,
    eos_token_id: int | None = None,
    draft_head: DraftHead | None = None,
    engine: bool | None = None,
    min_confidence: float = 0.0,
    lookup: int = 0,
):
    """Greedy decoding at depth ``target`` with drafts from depth ``draft`` (module docstring), the drafts
    scored by ``draft_head`` if given (the full head otherwise). Returns ``(tokens, SpeculativeStats)``;
    ``tokens`` is the prompt followed by the new tokens, as :func:`greedy_generate` returns. One prompt at a
    time (batch 1). ``engine`` as for :func:`greedy_generate`.

    ``min_confidence`` makes the draft length adaptive: a round stops drafting (before its ``draft_tokens``)
    once the draft's probability for the token it just proposed is below it, since an unsure draft is
    likely rejected and every further draft pass would be wasted. At least one token is drafted per round;
    the output is unchanged (the verifier decides every token).

    ``lookup=n`` drafts from the context first: when the last ``n`` tokens occurred earlier, the tokens that
    followed them are the round's draft (:func:`lookup_draft`), at no forward pass; the depth drafts only
    when they did not (``draft=None``: never; such a round is a plain decoding step)."""
    input_ids = _check_prompt(input_ids)
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative decoding takes one prompt at a time (batch 1), got a batch of {input_ids.shape[0]}"
        )
    if draft_tokens < 1 or max_new_tokens < 1:
        raise ValueError(f"draft_tokens and max_new_tokens must be at least 1, got {draft_tokens} and {max_new_tokens}")
    if draft_tokens >= FEW_TOKENS:
        # a verification of more tokens would use kernels that sum them in another order than one-token steps
        raise ValueError(f"draft_tokens must be below {FEW_TOKENS} (verified exactly in one pass), got {draft_tokens}")
    if not 0.0 <= min_confidence < 1.0:
        raise ValueError(f"min_confidence is a probability in [0, 1), got {min_confidence}")
    if lookup < 0 or (draft is None and lookup == 0):
        raise ValueError(
            f"lookup is an n-gram length (>= 1 to draft from the context, 0 for none), got {lookup}; "
            f"draft=None needs lookup >= 1 (something must draft)"
        )
    n = net.num_stages
    target_depth = SkipConfig(target, num_stages=n)
    draft_depth = SkipConfig(draft, num_stages=n) if draft is not None else None
    capacity = input_ids.shape[1] + max_new_tokens + draft_tokens
    target_stream = open_stream(net, target_depth, capacity, 1, engine)
    draft_stream = open_stream(net, draft_depth, capacity, 1, engine) if draft_depth is not None else None
    stats = SpeculativeStats(
        str(draft_depth) if draft_depth is not None else "none",
        str(target_depth),
        draft_tokens,
        0,
        0,
        0,
        0,
        0,
        0.0,
        len(draft_head) if draft_head is not None else None,
        target_stream.is_engine,
        min_confidence,
        lookup,
    )
    start = time.perf_counter()
    sequence = input_ids
    first = _greedy_next(target_stream, sequence)
    stats.target_passes += 1
    sequence = torch.cat([sequence, first], dim=1)
    produced, finished = 1, eos_token_id is not None and int(first) == eos_token_id
    while produced < max_new_tokens and not finished:
        k = min(draft_tokens, max_new_tokens - produced)
        proposal = lookup_draft(sequence, lookup, k) if lookup else None
        from_context = proposal is not None
        if from_context:
            stats.lookup_drafted += proposal.shape[1]
        elif draft_stream is not None:
            proposal = _draft_round(draft_stream, sequence, k, draft_head, min_confidence, stats)
        else:
            proposal = sequence[:, :0]  # nothing to propose: a plain decoding step
        k = proposal.shape[1]
        block = torch.cat([sequence[:, target_stream.length :], proposal], dim=1)
        choices = _greedy_next(target_stream, block, keep=block.shape[1])[0]
        stats.target_passes += 1
        # choices[i] is the target's token after block[:i + 1]: the last of them follows the last draft.
        choices = choices[-(k + 1) :]
        accepted = 0
        while accepted < k and int(proposal[0, accepted]) == int(choices[accepted]):
            accepted += 1
        new = torch.cat([proposal[0, :accepted], choices[accepted : accepted + 1]])[: max_new_tokens - produced]
        stats.drafted += k
        stats.accepted += accepted
        if from_context:
            stats.lookup_accepted += accepted
        if eos_token_id is not None and bool((new == eos_token_id).any()):
            new = new[: int((new == eos_token_id).nonzero()[0]) + 1]
            finished = True
        sequence = torch.cat([sequence, new[None]], dim=1)
        produced += new.numel()
        # The caches hold keys and values up to the token before the last one: that one is fed next round.
        target_stream.keep(sequence.shape[1] - 1)
        if draft_stream is not None:
            draft_stream.keep(min(draft_stream.length, sequence.shape[1] - 1))
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = produced
    return sequence, stats

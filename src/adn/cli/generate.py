"""``adn generate``: greedy text generation at any depth of an adaptive depth language model, or
self-speculative decoding (``--speculative``: a shallow depth drafts, the super-net verifies; the output is
the super-net's own greedy output)."""

from __future__ import annotations

import argparse
import sys

import torch

from ..utils import jsonout
from ..lm.precision import DTYPE_CHOICES
from .common import positive_int
from .lm_flags import (
    add_engine_flag,
    add_model_flags,
    add_text_flags,
    check_depth,
    engine_choice,
    network,
    non_negative_int,
    planned_network,
)


def add(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="greedy generation at one depth of an adaptive depth LM, or self-speculative decoding (--speculative)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_flags(p)
    add_engine_flag(p)
    add_text_flags(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the tokenizer's chat template (instruction-tuned models such as SmolLM2-Instruct)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=64,
        help="tokens to generate after the prompt (the prompt and these must fit the model's context)",
    )
    p.add_argument(
        "--skip",
        default=None,
        help="the depth that generates (TTFF, super, base; default super); with --speculative, the depth that verifies",
    )
    p.add_argument(
        "--tokens-per-s",
        type=positive_float,
        default=None,
        metavar="T",
        help="instead of --skip: the most accurate depth whose measured decoding speed in --depth-table is "
        "at least T tokens/s",
    )
    p.add_argument(
        "--depth-table",
        default=None,
        metavar="FILE",
        help="with --tokens-per-s: the per-depth table adn eval-lm --save-json FILE (or --json > FILE) wrote "
        "for this model, on this machine, with the same --threads and --dtype",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="the weights' dtype while decoding (auto: bfloat16 where the CPU computes it natively, "
        "float32 elsewhere; bfloat16 halves the bytes read per token)",
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="draft with --draft, verify with --skip in one pass per round; also runs plain greedy decoding "
        "at --skip to check the output is identical and to measure the speed-up",
    )
    p.add_argument(
        "--draft",
        default="base",
        help="the depth that drafts (none: only --lookup drafts; other rounds are plain steps)",
    )
    p.add_argument("--draft-tokens", type=positive_int, default=4, help="tokens drafted per round (k, at most)")
    p.add_argument(
        "--draft-confidence",
        type=probability,
        default=0.0,
        metavar="P",
        help="adaptive draft length: a round stops drafting once the draft's probability for its token is below "
        "P (0: always --draft-tokens); the output does not change",
    )
    p.add_argument(
        "--lookup",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="with --speculative: draft from the context first: when the last N tokens occurred earlier, the "
        "tokens that followed them are the draft (no forward pass); --draft drafts the other rounds. 0: off",
    )
    p.add_argument(
        "--draft-vocab",
        type=positive_int,
        default=None,
        metavar="K",
        help="with --speculative: the draft scores only the K most frequent tokens of --text's training "
        "documents (the verifier keeps the full head: the output does not change). Default: all",
    )
    p.add_argument(
        "--vocab-tokens",
        type=positive_int,
        default=2_000_000,
        help="with --draft-vocab: training tokens the frequencies are counted on",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the text and statistics as JSON on stdout at the end (without it, the text is printed "
        "as it is generated; Ctrl-C stops and keeps what was generated)",
    )
    p.set_defaults(run=run)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def probability(text: str) -> float:
    """A probability in [0, 1) (--draft-confidence: 1 would stop every round after one draft)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1), got {text}")
    return value


def _chosen_depth(args, stages: int | None):
    """``(skip text, table row or None)``: --skip, or the depth --tokens-per-s picks from --depth-table
    (checked before the model load: the table, its depths against the network's stages, the speed)."""
    from ..lm.depth_table import LMDepthTable
    from ..lm.precision import decoding_dtype, dtype_name

    if args.tokens_per_s is None:
        if args.depth_table is not None:
            raise ValueError("--depth-table is read only to choose a depth by --tokens-per-s T; give both, or neither")
        return args.skip or "super", None
    if args.depth_table is None:
        raise ValueError(
            "--tokens-per-s needs the measured speed of every depth: --depth-table FILE, written by "
            "adn eval-lm [--checkpoint C] --save-json FILE on this machine"
        )
    if args.skip is not None:
        raise ValueError("give either --skip (a depth) or --tokens-per-s (the depth chosen by speed), not both")
    if args.speculative:
        raise ValueError(
            "--tokens-per-s chooses the depth of plain greedy decoding; leave out --speculative "
            "(or give the verifying depth with --skip)"
        )
    table = LMDepthTable.load(args.depth_table)
    if stages is not None and table.num_stages != stages:
        raise ValueError(
            f"--depth-table {args.depth_table} describes a network of {table.num_stages} stages, this one "
            f"has {stages}: measure a table for this model and grouping (adn eval-lm --save-json FILE)"
        )
    measured = table.meta.get("conditions") if isinstance(table.meta.get("conditions"), dict) else {}
    here = {"dtype": dtype_name(decoding_dtype(args.dtype)), "threads": torch.get_num_threads()}
    for key, flag in (("dtype", "--dtype"), ("threads", "--threads")):
        if measured.get(key) is not None and measured[key] != here[key]:
            print(
                f"adn: note: the table's speeds were measured with {key} {measured[key]}, this run decodes with "
                f"{here[key]} ({flag})",
                file=sys.stderr,
            )
    row = table.choose(args.tokens_per_s)
    return row["skip"], row


def _prompt_ids(tokenizer, args) -> torch.Tensor:
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this tokenizer has no chat template; leave --chat out")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = args.prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat).input_ids
    if ids.shape[1] == 0:
        raise ValueError("--prompt is empty after tokenization; give some text")
    return ids


def _check_length(new_tokens: int, context: int | None, prompt_tokens: int = 0) -> None:
    """The prompt and the new tokens must fit the model's context (its position embeddings end there)."""
    if context is not None and prompt_tokens + new_tokens > context:
        room = context - prompt_tokens
        prompt = f"the prompt takes {prompt_tokens} tokens, so " if prompt_tokens else ""
        raise ValueError(
            f"--max-new-tokens {new_tokens}: the model's context is {context} tokens and {prompt}at most "
            f"{max(room, 0)} new tokens fit; give --max-new-tokens {max(room, 1)} or less"
            + (" and a shorter --prompt" if room < 1 else "")
        )


class TextStream:
    """Prints the text of new tokens as they come (stdout, flushed): each token's text is the difference
    between the decoded text of all new tokens and what was printed, held back while it ends in an
    incomplete character."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token.reshape(-1)[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._show(text)

    def _show(self, text: str) -> None:
        self.out.write(text[len(self.shown) :])  # (were earlier text to change, its new end is still shown)
        self.out.flush()
        self.shown = text

    def finish(self) -> None:
        self._show(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        self.out.write("\n")
        self.out.flush()


def run(args) -> int:
    from ..lm.checkpoint import read_lm_checkpoint
    from ..lm.corpus import load_corpus, token_stream
    from ..lm.engine import FEW_TOKENS
    from ..lm.generate import DraftHead, frequent_tokens, greedy_generate, speculative_generate
    from ..lm.precision import cast_weights, decoding_dtype, dtype_name

    # Everything that can be checked before the (slow) model load is: the prompt, the depths, the length.
    if not args.prompt.strip():
        raise ValueError("--prompt is empty; give the text to continue")
    data = read_lm_checkpoint(args.checkpoint) if args.checkpoint else None
    stages, context = planned_network(args, data["meta"] if data else None)
    skip, chosen = _chosen_depth(args, stages)
    check_depth(skip, stages, "--skip")
    if args.speculative and args.draft_tokens >= FEW_TOKENS:
        raise ValueError(
            f"--draft-tokens {args.draft_tokens}: at most {FEW_TOKENS - 1} (a verification of the drafts and one "
            f"more token is computed exactly as one-token steps up to {FEW_TOKENS} tokens)"
        )
    if args.lookup and not args.speculative:
        raise ValueError("--lookup drafts --speculative decoding from the context; add --speculative or leave it out")
    if args.speculative and args.draft == "none" and not args.lookup:
        raise ValueError("--draft none leaves nothing to draft: add --lookup N (context drafts) or name a depth")
    if args.speculative and args.draft != "none":
        check_depth(args.draft, stages, "--draft")
    if args.draft_vocab is not None and not args.speculative:
        raise ValueError(
            "--draft-vocab restricts the draft of --speculative decoding; add --speculative or leave it out"
        )
    if args.draft_confidence and not args.speculative:
        raise ValueError(
            "--draft-confidence sets the draft length of --speculative decoding; add --speculative or leave it out"
        )
    corpus = load_corpus(args.text, args.heldout_share) if args.draft_vocab is not None else None  # before the load
    _check_length(args.max_new_tokens, context)

    net, tokenizer, description = network(args, data)
    cast_weights(net, decoding_dtype(args.dtype))
    depth = check_depth(skip, net.num_stages, "--skip")
    draft = check_depth(args.draft, net.num_stages, "--draft") if args.speculative and args.draft != "none" else None
    draft_head = None
    if corpus is not None:
        vocab = net.get_output_embeddings().weight.shape[0]
        if args.draft_vocab < vocab:
            stream = token_stream(tokenizer, corpus.train, args.vocab_tokens)
            draft_head = DraftHead(net, frequent_tokens(stream, args.draft_vocab, vocab))
    ids = _prompt_ids(tokenizer, args)
    _check_length(args.max_new_tokens, context or getattr(net.config, "max_position_embeddings", None), ids.shape[1])
    eos = tokenizer.eos_token_id
    result = {"model": description, "skip": str(depth), "dtype": dtype_name(next(net.parameters()).dtype)}
    if chosen is not None:
        result["chosen_by_speed"] = {
            "tokens_per_s_asked": args.tokens_per_s,
            "depth_table": args.depth_table,
            "measured_tokens_per_s": chosen["tokens_per_s"],
            "ppl": chosen["ppl"],
        }
        print(
            f"adn: --tokens-per-s {args.tokens_per_s:g}: depth {depth} (measured {chosen['tokens_per_s']:.1f} "
            f"tokens/s, perplexity {chosen['ppl']:.3f} in {args.depth_table})",
            file=sys.stderr,
        )
    stream = None if args.json else TextStream(tokenizer)
    collected: list[torch.Tensor] = []

    def on_token(token: torch.Tensor) -> None:
        collected.append(token)
        if stream is not None:
            stream(token)

    try:
        plain, plain_stats = greedy_generate(
            net,
            ids,
            args.max_new_tokens,
            skip=depth,
            eos_token_id=eos,
            return_stats=True,
            on_token=on_token,
            engine=engine_choice(args),
        )
    except KeyboardInterrupt:
        return _interrupted(args, result, tokenizer, collected, stream)
    if stream is not None:
        stream.finish()
    plain_seconds = plain_stats.prefill_seconds + plain_stats.decode_seconds
    result.update(
        new_tokens=plain_stats.new_tokens,
        tokens_per_second=plain_stats.new_tokens / plain_seconds,
        engine=plain_stats.engine,
    )
    output = plain
    if args.speculative:
        try:
            output, stats = speculative_generate(
                net,
                ids,
                args.max_new_tokens,
                draft=draft,
                target=depth,
                draft_tokens=args.draft_tokens,
                eos_token_id=eos,
                draft_head=draft_head,
                engine=engine_choice(args),
                min_confidence=args.draft_confidence,
                lookup=args.lookup,
            )
        except KeyboardInterrupt:
            print(
                "adn: interrupted during the speculative run; the text above is plain greedy decoding's, complete",
                file=sys.stderr,
            )
            return 130
        result["speculative"] = {
            **stats.as_dict(),
            "identical_to_plain_greedy": torch.equal(output, plain),
            "speed_up": stats.tokens_per_second / result["tokens_per_second"],
        }
    text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    result["text"] = text
    if args.json:
        print(jsonout.dumps(result, indent=2))
    else:
        print(
            f"{description}; depth {depth}: {result['new_tokens']} tokens at {result['tokens_per_second']:.1f} tokens/s "
            f"(greedy, KV cache, prefill included, {result['dtype']} weights, {torch.get_num_threads()} threads, "
            f"{'decoding engine' if result['engine'] else 'model forward'})",
            file=sys.stderr,
        )
        if args.speculative:
            s = result["speculative"]
            head = f", head of {s['draft_vocab']} tokens" if s.get("draft_vocab") else ""
            if s["lookup"]:
                head += (
                    f"; context drafts of {s['lookup']}-grams: {s['lookup_accepted']}/{s['lookup_drafted']} accepted"
                )
            print(
                f"speculative: draft {s['draft']} (k={s['draft_tokens']}{head}) -> verify {s['target']}: acceptance "
                f"{s['acceptance_rate']:.1%}, {s['tokens_per_target_pass']:.2f} tokens per verifying pass, "
                f"{s['tokens_per_second']:.1f} tokens/s = {s['speed_up']:.2f}x plain greedy; output identical to "
                f"plain greedy: {s['identical_to_plain_greedy']}",
                file=sys.stderr,
            )
    sys.stdout.flush()
    return 0


def _interrupted(args, result: dict, tokenizer, collected: list[torch.Tensor], stream) -> int:
    """Ctrl-C during generation: what was generated so far is the answer (printed whole, JSON or text)."""
    ids = [int(token.reshape(-1)[0]) for token in collected]
    if stream is not None:
        stream.finish()
    else:
        print(
            jsonout.dumps(
                {
                    **result,
                    "new_tokens": len(ids),
                    "interrupted": True,
                    "text": tokenizer.decode(ids, skip_special_tokens=True),
                },
                indent=2,
            )
        )
    sys.stdout.flush()
    print(f"adn: interrupted after {len(ids)} new token(s); the text above is what was generated", file=sys.stderr)
    return 130

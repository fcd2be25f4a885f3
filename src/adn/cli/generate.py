"""``adn generate``: greedy text generation at any depth of an adaptive depth language model, or
self-speculative decoding (``--speculative``: a shallow depth drafts, the super-net verifies; the output is
the super-net's own greedy output)."""
from __future__ import annotations

import argparse
import sys

import torch

from ..utils import jsonout
from .common import positive_int
from .lm_flags import add_model_flags, network


def add(sub) -> None:
    p = sub.add_parser("generate", help="greedy generation at one depth of an adaptive depth LM, or self-speculative "
                                        "decoding (--speculative)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template "
                                                      "(instruction-tuned models such as SmolLM2-Instruct)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate after the prompt")
    p.add_argument("--skip", default="super", help="the depth that generates (TTFF, super, base); with --speculative, "
                                                   "the depth that verifies")
    p.add_argument("--speculative", action="store_true",
                   help="draft with --draft, verify with --skip in one pass per round; also runs plain greedy decoding "
                        "at --skip to check the output is identical and to measure the speed-up")
    p.add_argument("--draft", default="base", help="the depth that drafts")
    p.add_argument("--draft-tokens", type=positive_int, default=4, help="tokens drafted per round (k)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the text and statistics as JSON on stdout")
    p.set_defaults(run=run)


def _prompt_ids(tokenizer, args) -> torch.Tensor:
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this tokenizer has no chat template; leave --chat out")
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = args.prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat).input_ids
    if ids.shape[1] == 0:
        raise ValueError("--prompt is empty after tokenization; give some text")
    return ids


def run(args) -> int:
    from ..lm.generate import greedy_generate, speculative_generate
    from ..core.skip import SkipConfig

    net, tokenizer, description = network(args)
    depth = SkipConfig(args.skip, num_stages=net.num_stages)
    ids = _prompt_ids(tokenizer, args)
    eos = tokenizer.eos_token_id
    result = {"model": description, "skip": str(depth)}
    plain, plain_stats = greedy_generate(net, ids, args.max_new_tokens, skip=depth, eos_token_id=eos, return_stats=True)
    plain_seconds = plain_stats.prefill_seconds + plain_stats.decode_seconds
    result.update(new_tokens=plain_stats.new_tokens, tokens_per_second=plain_stats.new_tokens / plain_seconds)
    output = plain
    if args.speculative:
        draft = SkipConfig(args.draft, num_stages=net.num_stages)
        output, stats = speculative_generate(net, ids, args.max_new_tokens, draft=draft, target=depth,
                                             draft_tokens=args.draft_tokens, eos_token_id=eos)
        result["speculative"] = {**stats.as_dict(), "identical_to_plain_greedy": torch.equal(output, plain),
                                 "speed_up": stats.tokens_per_second / result["tokens_per_second"]}
    text = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
    result["text"] = text
    if args.json:
        print(jsonout.dumps(result, indent=2))
    else:
        print(text)
        print(f"{description}; depth {depth}: {result['new_tokens']} tokens at {result['tokens_per_second']:.1f} tokens/s "
              f"(greedy, KV cache, prefill included, {torch.get_num_threads()} threads)", file=sys.stderr)
        if args.speculative:
            s = result["speculative"]
            print(f"speculative: draft {s['draft']} (k={s['draft_tokens']}) -> verify {s['target']}: acceptance "
                  f"{s['acceptance_rate']:.1%}, {s['tokens_per_target_pass']:.2f} tokens per verifying pass, "
                  f"{s['tokens_per_second']:.1f} tokens/s = {s['speed_up']:.2f}x plain greedy; output identical to "
                  f"plain greedy: {s['identical_to_plain_greedy']}", file=sys.stderr)
    sys.stdout.flush()
    return 0

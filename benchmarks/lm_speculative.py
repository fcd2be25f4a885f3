"""Self-speculative decoding of an adaptive depth language model: acceptance rate and speed-up.

For each of ``--prompts`` held-out prompts (``--prompt-tokens`` tokens each, spread over the held-out text),
greedy decoding of ``--new-tokens`` tokens by the super-net alone, then speculative decoding with every
``--draft`` depth and every ``--draft-tokens`` k; runs interleaved per prompt. Reports the acceptance rate
(drafts the super-net agreed with), tokens per verifying pass, tokens/s and speed-up (time of plain greedy /
time of speculative, summed over prompts, prefill included), and checks every output equals plain greedy.

    python benchmarks/lm_speculative.py [--checkpoint runs/lm/smollm2-adn/checkpoint.pt | --model smollm2]
        [--draft base,TTFF] [--draft-tokens 2,4] [--prompts 8] [--new-tokens 64] [--threads 2] [--json]
        [--save-json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from adn.convert.llama import convert_decoder
from adn.lm.checkpoint import load_lm
from adn.lm.corpus import load_corpus, token_stream
from adn.lm.generate import greedy_generate, speculative_generate
from adn.lm.model import load_causal_lm
from adn.core.skip import SkipConfig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--model", default=None, help="without --checkpoint: converted, not fine-tuned (default smollm2)")
    p.add_argument("--text", default=None)
    p.add_argument("--draft", default="base", help="comma-separated draft depths")
    p.add_argument("--draft-tokens", default="2,4", help="comma-separated k values")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--save-json", default=None, metavar="FILE", help="also write the JSON to FILE")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        net, tokenizer, _ = load_lm(args.checkpoint)
        what = args.checkpoint
    else:
        model, tokenizer = load_causal_lm(args.model)
        net, what = convert_decoder(model).eval(), f"{args.model or 'smollm2'} (converted, not fine-tuned)"
    corpus = load_corpus(args.text)
    stream = token_stream(tokenizer, corpus.heldout)
    spacing = max(args.prompt_tokens, (stream.numel() - args.prompt_tokens) // args.prompts)
    prompts = [stream[i * spacing: i * spacing + args.prompt_tokens][None] for i in range(args.prompts)]
    drafts = [SkipConfig(d, num_stages=net.num_stages) for d in args.draft.split(",")]
    ks = [int(k) for k in args.draft_tokens.split(",")]
    greedy_generate(net, prompts[0], 4)  # warm-up
    plain_seconds, runs = 0.0, {(str(d), k): [] for d in drafts for k in ks}
    identical = True
    for prompt in prompts:
        start = time.perf_counter()
        want = greedy_generate(net, prompt, args.new_tokens, eos_token_id=None)
        plain_seconds += time.perf_counter() - start
        for draft in drafts:
            for k in ks:
                got, stats = speculative_generate(net, prompt, args.new_tokens, draft=draft, draft_tokens=k)
                identical &= torch.equal(got, want)
                runs[(str(draft), k)].append(stats)
    tokens = args.prompts * args.new_tokens
    rows = []
    for (draft, k), stats in runs.items():
        seconds = sum(s.seconds for s in stats)
        rows.append({"draft": draft, "k": k, "acceptance_rate": sum(s.accepted for s in stats) / sum(s.drafted for s in stats),
                     "tokens_per_target_pass": tokens / sum(s.target_passes for s in stats),
                     "tokens_per_s": tokens / seconds, "plain_tokens_per_s": tokens / plain_seconds,
                     "speed_up": plain_seconds / seconds})
    header = (f"{what}: {args.prompts} held-out prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens each, "
              f"greedy, batch 1, {torch.get_num_threads()} threads; outputs identical to plain greedy: {identical}")
    result = json.dumps({"setting": header, "identical": identical, "rows": rows}, indent=2)
    if args.save_json:
        Path(args.save_json).write_text(result + "\n")
    if args.json:
        print(result)
    else:
        print(header)
        print(f"{'draft':>8} {'k':>3} {'accept':>7} {'tok/pass':>8} {'tok/s':>7} {'plain':>7} {'speed-up':>8}")
        for r in rows:
            print(f"{r['draft']:>8} {r['k']:>3} {r['acceptance_rate']:>7.1%} {r['tokens_per_target_pass']:>8.2f} "
                  f"{r['tokens_per_s']:>7.1f} {r['plain_tokens_per_s']:>7.1f} {r['speed_up']:>7.2f}x")
    sys.stdout.flush()
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

"""Self-speculative decoding of an adaptive depth language model: acceptance rate and speed-up.

For each of ``--prompts`` held-out prompts (``--prompt-tokens`` tokens each, spread over the held-out text),
greedy decoding of ``--new-tokens`` tokens by the super-net alone, then speculative decoding with every
``--draft`` depth and every ``--draft-tokens`` k; runs interleaved per prompt. Reports the acceptance rate
(drafts the super-net agreed with), tokens per verifying pass, tokens/s and speed-up (time of plain greedy /
time of speculative, summed over prompts, prefill included), and checks every output equals plain greedy.

``--min-confidence P1,P2`` also drafts with an adaptive length: a round stops drafting once the draft's
probability for its token is below P (0 = always k; the break-even columns assume k drafts per round).

``--draft-vocab K1,K2`` also drafts with the output head restricted to the K most frequent tokens of the
corpus's training documents (:class:`adn.lm.generate.DraftHead`; 0 = the full head), the verifier keeping
the full head. The break-even table: for each draft, its measured cost per pass relative to a decoding step
of the target (``c``, from the tokens/s of drafting alone and of plain greedy decoding), and the acceptance
rate each k needs for a speed-up of 1.0x and 1.2x under the usual model (independent acceptance ``a``;
tokens per round ``(1 - a^(k+1)) / (1 - a)``; time per round ``k c + v`` target steps, where ``v``, the
cost of one verifying pass over k + 1 tokens relative to a one-token step, is measured too, interleaved, best
of 5), next to the acceptance measured. ``--plot FILE`` draws the break-even curves (acceptance needed against
draft cost, for each k, at 1.0x and 1.2x) with every measured draft on them.

``--lookup N1,N2`` also drafts from the context first (prompt lookup: what followed the last N tokens
earlier in the text, no forward pass; 0 = off); ``--draft none`` with it drafts nothing else (rounds without a
match are plain steps). Such rows report the share of drafts the context made and their acceptance; their
point on the plot sits at the depth draft's cost (0 for ``none``), which the context drafts do not pay.

Weights in ``--dtype`` (``auto``: bfloat16 where the CPU computes it natively, as ``adn generate``), decoded
by the decoding engine where it runs the model (``--engine auto``; :mod:`adn.lm.engine`) or by the model's
own forward (``--engine off``).

    python benchmarks/lm_speculative.py [--checkpoint runs/lm/smollm2-adn/checkpoint.pt | --model smollm2]
        [--draft base,TTFF,none] [--draft-tokens 2,4] [--draft-vocab 0,8192] [--lookup 0,2] [--prompts 8] [--new-tokens 64]
        [--threads 2] [--dtype auto] [--engine auto] [--text DIR] [--json] [--save-json FILE] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

import torch

from adn.convert.llama import convert_decoder
from adn.lm.checkpoint import load_lm
from adn.lm.depth_table import cpu_name
from adn.lm.corpus import load_corpus, token_stream
from adn.lm.generate import (
    ENGINE_CHOICES,
    DraftHead,
    draft_next,
    frequent_tokens,
    greedy_generate,
    open_stream,
    speculative_generate,
)
from adn.lm.model import load_causal_lm
from adn.lm.precision import DTYPE_CHOICES, cast_weights, decoding_dtype, dtype_name
from adn.core.skip import SkipConfig


def git_commit() -> str | None:
    """The commit of this checkout (what the measurement ran), or None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def break_even(cost: float, k: int, speed_up: float, v: float = 1.0) -> float | None:
    """The acceptance rate at which drafting k tokens at ``cost`` target steps each gives ``speed_up``
    (model in the module docstring); None when no rate below 1 does."""

    def gain(a: float) -> float:
        tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
        return tokens / (k * cost + v)

    if gain(1.0) < speed_up:
        return None
    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if gain(mid) < speed_up else (low, mid)
    return high


def draft_speed(net, prompt, new_tokens: int, depth: SkipConfig, head: DraftHead | None, engine) -> float:
    """Tokens/s of drafting alone (greedy at ``depth`` with ``head``), the prefill not counted."""
    stream, pending = open_stream(net, depth, prompt.shape[1] + new_tokens + 1, engine=engine), prompt
    with torch.no_grad():
        for step in range(new_tokens + 1):
            if step == 1:
                start = time.perf_counter()
            pending = draft_next(stream, pending, head)[0]
    return new_tokens / (time.perf_counter() - start)


def verify_cost(net, prompt, k: int, engine, repeats: int = 5) -> float:
    """Time of one target pass over k + 1 new tokens (a verification) over that of a one-token step, best of
    ``repeats`` each, interleaved, after the prompt is cached (the cache rolled back after every pass)."""
    target = SkipConfig.super_net(net.num_stages)
    stream = open_stream(net, target, prompt.shape[1] + k + 1, engine=engine)
    with torch.no_grad():
        stream.hidden(prompt)
        cached = stream.length
        best = {1: float("inf"), k + 1: float("inf")}
        for _ in range(repeats):
            for count in best:
                start = time.perf_counter()
                stream.logits(stream.hidden(prompt[:, :count], keep=count)).argmax(-1)
                best[count] = min(best[count], time.perf_counter() - start)
                stream.keep(cached)
    return best[k + 1] / best[1]


def plot_break_even(rows: list[dict], path: str, title: str) -> None:
    """Acceptance needed against draft cost for each k (1.0x solid, 1.2x dashed; verification at its
    measured cost), with each measured draft as a point at its cost and measured acceptance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    costs = [i / 100 for i in range(1, 100)]
    for i, k in enumerate(sorted({r["k"] for r in rows})):
        color = f"C{i}"
        v = next(r["verify_cost"] for r in rows if r["k"] == k)
        for speed_up, style in ((1.0, "-"), (1.2, "--")):
            points = [(c, break_even(c, k, speed_up, v)) for c in costs]
            points = [(c, a) for c, a in points if a is not None]
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"k={k}: needed for {speed_up:.1f}x (v={v:.2f})")
        for r in (r for r in rows if r["k"] == k):
            marker = "o" if r["min_confidence"] == 0 else "^"
            ax.scatter(r["draft_cost"], r["acceptance_rate"], color=color, marker=marker, zorder=3)
            ax.annotate(
                f"{r['speed_up']:.2f}x",
                (r["draft_cost"], r["acceptance_rate"]),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
    ax.set_xlabel("draft cost c (a draft pass / a target decoding step)")
    ax.set_ylabel("acceptance rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(textwrap.fill(title, 120), fontsize=7)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--model", default=None, help="without --checkpoint: converted, not fine-tuned (default smollm2)")
    p.add_argument("--text", default=None)
    p.add_argument("--draft", default="base", help="comma-separated draft depths (none: only --lookup drafts)")
    p.add_argument("--draft-tokens", default="2,4", help="comma-separated k values")
    p.add_argument(
        "--draft-vocab",
        default="0",
        help="comma-separated K: the draft's head restricted to the K most frequent training tokens (0: the full head)",
    )
    p.add_argument(
        "--min-confidence",
        default="0",
        help="comma-separated: adaptive draft length, a round stops drafting once the draft's probability for "
        "its token is below this (0: always k drafts)",
    )
    p.add_argument(
        "--lookup",
        default="0",
        help="comma-separated n-gram lengths: draft from the context first (prompt lookup; 0: off)",
    )
    p.add_argument("--vocab-tokens", type=int, default=2_000_000, help="training tokens the frequencies are counted on")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="weights while decoding")
    p.add_argument("--engine", choices=tuple(ENGINE_CHOICES), default="auto", help="decode with adn.lm.engine")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--save-json", default=None, metavar="FILE", help="also write the JSON to FILE")
    p.add_argument("--plot", default=None, metavar="FILE", help="also draw the break-even curves to FILE (png)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        net, tokenizer, _ = load_lm(args.checkpoint)
        what = args.checkpoint
    else:
        model, tokenizer = load_causal_lm(args.model)
        net, what = convert_decoder(model).eval(), f"{args.model or 'smollm2'} (converted, not fine-tuned)"
    cast_weights(net, decoding_dtype(args.dtype))
    engine = ENGINE_CHOICES[args.engine]
    corpus = load_corpus(args.text)
    stream = token_stream(tokenizer, corpus.heldout)
    spacing = max(args.prompt_tokens, (stream.numel() - args.prompt_tokens) // args.prompts)
    prompts = [stream[i * spacing : i * spacing + args.prompt_tokens][None] for i in range(args.prompts)]
    drafts = [None if d == "none" else SkipConfig(d, num_stages=net.num_stages) for d in args.draft.split(",")]
    lookups = [int(n) for n in args.lookup.split(",")]
    ks = [int(k) for k in args.draft_tokens.split(",")]
    vocab = net.config.vocab_size
    heads = {}
    for size in (int(v) for v in args.draft_vocab.split(",")):
        if size and size < vocab:
            ids = frequent_tokens(token_stream(tokenizer, corpus.train, args.vocab_tokens), size, vocab)
            heads[size] = DraftHead(net, ids)
        else:
            heads[0] = None
    greedy_generate(net, prompts[0], 4, engine=engine)  # warm-up
    confidences = [float(c) for c in args.min_confidence.split(",")]
    # (draft None needs context drafts: something must draft)
    settings = [
        (d, k, v, c, n)
        for d in drafts
        for k in ks
        for v in heads
        for c in confidences
        for n in lookups
        if d is not None or n > 0
    ]
    plain_seconds, runs = 0.0, {(str(d), k, v, c, n): [] for d, k, v, c, n in settings}
    identical = True
    for prompt in prompts:
        start = time.perf_counter()
        want, plain_stats = greedy_generate(net, prompt, args.new_tokens, return_stats=True, engine=engine)
        plain_seconds += time.perf_counter() - start
        for draft, k, size, confidence, lookup in settings:
            got, stats = speculative_generate(
                net,
                prompt,
                args.new_tokens,
                draft=draft,
                draft_tokens=k,
                draft_head=heads[size],
                engine=engine,
                min_confidence=confidence,
                lookup=lookup,
            )
            identical &= torch.equal(got, want)
            runs[(str(draft), k, size, confidence, lookup)].append(stats)
    # Cost of a draft pass relative to a target decoding step: tokens/s of each alone, on the first prompt.
    # Interleaved, best of 3: a change of load touches the target and every draft alike.
    super_net = SkipConfig.super_net(net.num_stages)
    best = {}
    for _ in range(3):
        for key, depth, head in [
            ("target", super_net, None),
            *(((str(d), size), d, head) for d in drafts if d is not None for size, head in heads.items()),
        ]:
            speed = draft_speed(net, prompts[0], args.new_tokens, depth, head, engine)
            best[key] = max(best.get(key, 0.0), speed)
    cost = {key: best["target"] / tps for key, tps in best.items() if key != "target"}
    cost.update({("None", size): 0.0 for size in heads})  # no depth drafts: no draft passes
    verify = {k: verify_cost(net, prompts[0], k, engine) for k in ks}
    tokens = args.prompts * args.new_tokens
    rows = []
    for (draft, k, size, confidence, lookup), stats in runs.items():
        seconds = sum(s.seconds for s in stats)
        drafted, context = sum(s.drafted for s in stats), sum(s.lookup_drafted for s in stats)
        c = cost[(draft, size)]
        rounds = sum(s.target_passes - 1 for s in stats)  # the prefill pass drafts nothing
        rows.append(
            {
                "draft": "none" if draft == "None" else draft,
                "k": k,
                "draft_vocab": size or vocab,
                "min_confidence": confidence,
                "drafted_per_round": sum(s.drafted for s in stats) / max(rounds, 1),
                "acceptance_rate": sum(s.accepted for s in stats) / drafted if drafted else 0.0,
                "lookup": lookup,
                "context_share": context / drafted if drafted else 0.0,
                "context_acceptance": sum(s.lookup_accepted for s in stats) / context if context else None,
                "tokens_per_target_pass": tokens / sum(s.target_passes for s in stats),
                "tokens_per_s": tokens / seconds,
                "plain_tokens_per_s": tokens / plain_seconds,
                "speed_up": plain_seconds / seconds,
                "draft_cost": c,
                "verify_cost": verify[k],
                "acceptance_for_1.0x": break_even(c, k, 1.0, verify[k]),
                "acceptance_for_1.2x": break_even(c, k, 1.2, verify[k]),
            }
        )
    header = (
        f"{what}: {args.prompts} held-out prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens each, "
        f"greedy, batch 1, {torch.get_num_threads()} threads, {dtype_name(next(net.parameters()).dtype)} weights, "
        f"{'decoding engine' if plain_stats.engine else 'model forward'}; outputs identical to plain greedy: {identical}"
    )
    result = json.dumps(
        {
            "setting": header,
            "identical": identical,
            "commit": git_commit(),
            "threads": torch.get_num_threads(),
            "dtype": dtype_name(next(net.parameters()).dtype),
            "engine": plain_stats.engine,
            "cpu": cpu_name(),
            "rows": rows,
        },
        indent=2,
    )
    if args.save_json:
        Path(args.save_json).write_text(result + "\n")
    if args.plot:
        plot_break_even(rows, args.plot, header)
    if args.json:
        print(result)
    else:
        print(header)
        print(
            f"{'draft':>8} {'k':>3} {'vocab':>6} {'conf':>4} {'look':>4} {'ctx':>4} {'drafts':>6} {'accept':>7} "
            f"{'tok/pass':>8} {'tok/s':>7} {'plain':>7} "
            f"{'speed-up':>8} {'cost c':>6} {'v':>5} {'a@1.0x':>6} {'a@1.2x':>6}"
        )
        shown = lambda a: "never" if a is None else f"{a:.0%}"  # noqa: E731
        for r in rows:
            print(
                f"{r['draft']:>8} {r['k']:>3} {r['draft_vocab']:>6} {r['min_confidence']:>4.2f} "
                f"{r['lookup']:>4} {r['context_share']:>4.0%} "
                f"{r['drafted_per_round']:>6.2f} {r['acceptance_rate']:>7.1%} "
                f"{r['tokens_per_target_pass']:>8.2f} {r['tokens_per_s']:>7.1f} {r['plain_tokens_per_s']:>7.1f} "
                f"{r['speed_up']:>7.2f}x {r['draft_cost']:>6.2f} {r['verify_cost']:>5.2f} "
                f"{shown(r['acceptance_for_1.0x']):>6} "
                f"{shown(r['acceptance_for_1.2x']):>6}"
            )
    sys.stdout.flush()
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

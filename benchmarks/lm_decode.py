"""Greedy decoding speed of an adaptive depth language model per depth, float32 against bfloat16 weights, next
to the memory bandwidth of this machine and the speed it bounds.

Batch-1 decoding on a CPU reads every weight of the depth that runs once per token, so tokens/s is bounded by
``bandwidth / bytes of weights per token``. The script measures the bandwidth in the same run (the best of a
few passes of summing, and of copying, a tensor far larger than the caches, on the threads decoding uses),
then, interleaved (repeat after repeat, every depth and dtype in turn, the best of ``--repeats`` kept), the
decoding tokens/s of every ``--depths`` depth with float32 and with bfloat16 weights
(:func:`adn.lm.precision.cast_weights`), each decoded by the model's own forward (``forward``: what decoding
was before the engine, the baseline) and by the decoding engine (``engine``: :mod:`adn.lm.engine`, merged
projections, static KV cache, packed bfloat16 weights), and prints the ratios: each speed over the float32
forward at the same depth ("today's float32"), each depth over the first depth's float32 forward, and each
speed over its bandwidth bound. ``--ppl-tokens N`` also measures held-out perplexity (the default corpus or
``--text``) for each dtype and path (the engine's through its own prefill), for the "within 1% of float32"
check.

bfloat16 only pays where the CPU computes it natively (AVX512-BF16, AMX); the script says whether it does.

    python benchmarks/lm_decode.py [--checkpoint C | --model smollm2] [--depths super,base] [--dtypes float32,bfloat16]
        [--paths forward,engine] [--new-tokens 32] [--prompt-tokens 64] [--repeats 3] [--threads 1] [--bandwidth-mb 512] [--ppl-tokens 0]
        [--json] [--save-json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from adn.convert.llama import convert_decoder
from adn.core.skip import SkipConfig
from adn.lm.checkpoint import load_lm
from adn.lm.depth_table import cpu_name
from adn.lm.engine import running_layers
from adn.lm.evaluate import decoding_speed, perplexity
from adn.lm.model import load_causal_lm
from adn.lm.precision import cast_weights, dtype_name
from adn.training.precision import native_bfloat16


PATHS = {"forward": False, "engine": True}  # the decoding path: the model's own forward, or adn.lm.engine


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


def bandwidth(megabytes: int, repeats: int = 5) -> dict:
    """Read bandwidth (sum of a float32 tensor) and copy bandwidth (bytes read + written), GB/s, best of
    ``repeats``."""
    n = megabytes * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    src.sum()
    dst.copy_(src)
    best_sum = best_copy = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        best_sum = min(best_sum, time.perf_counter() - start)
        start = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - start)
    size = n * 4
    return {"megabytes": megabytes, "read_gb_s": size / best_sum / 1e9, "copy_gb_s": 2 * size / best_copy / 1e9}


def weight_bytes(net, depth: SkipConfig) -> int:
    """Bytes of weights decoding one token at ``depth`` reads: the sub-network's parameters, less an input
    embedding that is not tied to the output head (a token reads one of its rows)."""
    sub = net.subnet(depth)
    total = sum(p.numel() * p.element_size() for p in sub.parameters())
    embed, head = sub.get_input_embeddings().weight, sub.get_output_embeddings().weight
    if embed is not head:
        total -= embed.numel() * embed.element_size()
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument(
        "--model",
        default=None,
        help="without --checkpoint: converted (default grouping), not fine-tuned; default smollm2",
    )
    p.add_argument("--skippable", default="half", help="without --checkpoint: skippable layers per stage, N or half")
    p.add_argument("--depths", default="super,base", help="comma-separated depths")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument(
        "--paths", default="forward,engine", help="comma-separated: forward (the model's own), engine (adn.lm.engine)"
    )
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--prompt-tokens", type=int, default=64, help="a fixed pseudo-random prompt (speed does not depend on the text)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bandwidth-mb", type=int, default=512, help="size of the tensor the bandwidth is measured on")
    p.add_argument("--ppl-tokens", type=int, default=0, help="also held-out perplexity over N tokens per dtype")
    p.add_argument("--text", default=None, help="with --ppl-tokens: the corpus (default: Python 3.11's docs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--save-json", default=None, metavar="FILE", help="also write the JSON to FILE")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        net, tokenizer, _ = load_lm(args.checkpoint)
        what = args.checkpoint
    else:
        model, tokenizer = load_causal_lm(args.model, tokenizer=args.ppl_tokens > 0)
        skippable = None if args.skippable == "half" else int(args.skippable)
        net = convert_decoder(model, skippable=skippable).eval()
        what = f"{args.model or 'smollm2'} (converted with skippable={args.skippable}, not fine-tuned)"
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    nets = {dtype: net if dtype == torch.float32 else cast_weights(copy.deepcopy(net), dtype) for dtype in dtypes}
    depths = [SkipConfig(d, num_stages=net.num_stages) for d in args.depths.split(",")]
    vocab = net.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

    bw = bandwidth(args.bandwidth_mb)
    paths = args.paths.split(",")
    unknown = set(paths) - set(PATHS)
    if unknown:
        p.error(f"--paths: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PATHS)}")
    variants = [(dt, path) for dt in dtypes for path in paths]
    speed = {(str(d), dt, path): 0.0 for d in depths for dt, path in variants}
    for _ in range(args.repeats):  # interleaved: a change of load touches every depth, dtype and path alike
        for depth in depths:
            for dtype, path in variants:
                key = (str(depth), dtype, path)
                tps = decoding_speed(nets[dtype], prompt, args.new_tokens, depth, engine=PATHS[path])
                speed[key] = max(speed[key], tps)
    ppl = {}
    if args.ppl_tokens:
        from adn.lm.corpus import load_corpus, token_stream, windows

        stream = token_stream(tokenizer, load_corpus(args.text).heldout, args.ppl_tokens)
        held = windows(stream, min(256, stream.numel()))
        ppl = {
            (str(d), dt, path): perplexity(nets[dt], held, d, engine=PATHS[path])
            for d in depths
            for dt, path in variants
        }

    total_layers = len(running_layers(net, "super"))
    baseline = (torch.float32, "forward")
    reference = speed.get((str(depths[0]), *baseline)) or next(iter(speed.values()))
    rows = []
    for depth in depths:
        for dtype, path in variants:
            nbytes = weight_bytes(nets[dtype], depth)
            bound = bw["read_gb_s"] * 1e9 / nbytes
            tps = speed[(str(depth), dtype, path)]
            row = {
                "skip": str(depth),
                "dtype": dtype_name(dtype),
                "path": path,
                "layers": f"{len(running_layers(net, depth))}/{total_layers}",
                "weights_mb_per_token": nbytes / 1e6,
                "tokens_per_s": tps,
                "bound_tokens_per_s": bound,
                "share_of_bound": tps / bound,
                "speed_vs_first": tps / reference,
            }
            if baseline in variants:  # against today's float32: the model's own forward, same depth
                row["speed_vs_float32"] = tps / speed[(str(depth), *baseline)]
            if ppl:
                row["ppl"] = ppl[(str(depth), dtype, path)]
                if baseline in variants:
                    row["ppl_vs_float32"] = row["ppl"] / ppl[(str(depth), *baseline)]
            rows.append(row)
    setting = {
        "model": what,
        "cpu": cpu_name() or platform.processor(),
        "native_bfloat16": native_bfloat16("cpu"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "decoding": "greedy, KV cache, batch 1, prefill not counted, best of repeats (interleaved)",
        "bandwidth": bw,
        "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "commit": git_commit(),
    }
    result = {"setting": setting, "rows": rows}
    text = json.dumps(result, indent=2)
    if args.save_json:
        Path(args.save_json).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(
            f"{what}; {setting['cpu']} (native bfloat16: {setting['native_bfloat16']}), {setting['threads']} "
            f"thread(s); memory bandwidth: read {bw['read_gb_s']:.1f} GB/s, copy {bw['copy_gb_s']:.1f} GB/s "
            f"({bw['megabytes']} MB tensor)"
        )
        print(
            f"{'skip':>6} {'dtype':>9} {'path':>8} {'layers':>7} {'MB/token':>9} {'tok/s':>7} {'bound':>7} {'of bound':>8} "
            f"{'vs fp32':>7} {'vs first':>8}" + (f" {'ppl':>8} {'ppl/fp32':>8}" if ppl else "")
        )
        for r in rows:
            print(
                f"{r['skip']:>6} {r['dtype']:>9} {r['path']:>8} {r['layers']:>7} {r['weights_mb_per_token']:>9.1f} "
                f"{r['tokens_per_s']:>7.1f} {r['bound_tokens_per_s']:>7.1f} {r['share_of_bound']:>8.1%} "
                f"{r.get('speed_vs_float32', float('nan')):>6.2f}x {r['speed_vs_first']:>7.2f}x"
                + (f" {r['ppl']:>8.3f} {r.get('ppl_vs_float32', float('nan')):>8.4f}" if ppl else "")
            )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

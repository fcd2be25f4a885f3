"""``adn eval-lm``: held-out perplexity of every sub-network of an adaptive depth language model, next to
naive removal of the same layers, and greedy decoding speed per depth with the KV cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..utils import jsonout
from ..utils.atomic import atomic_write
from ..utils.outputs import OutputKind, json_file, output_path
from ..lm.precision import DTYPE_CHOICES
from .common import positive_int, skip_configs
from .lm_flags import add_engine_flag, add_model_flags, add_text_flags, engine_choice, fresh_network, planned_network

COLUMNS = [  # key, header, format
    ("skip", "skip", "{}"),
    ("layers", "layers", "{}"),
    ("params", "params (M)", "{:.2f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("naive_ppl", "naive ppl", "{:.3f}"),
    ("ppl_ratio", "ppl/super", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("speed_ratio", "speed/super", "{:.2f}"),
]

# What --save-json writes: a language-model depth table ({"format": "adn-lm-depth-table", "setting": ...,
# "rows": [...]}, adn.lm.depth_table), or before it {"setting": ..., "rows": [...]}; such a file may be replaced.
SAVED_ROWS = OutputKind(
    "rows adn eval-lm wrote",
    "eval-lm.json",
    lambda path: json_file(
        path,
        lambda data: (
            isinstance(data, dict)
            and {"setting", "rows"} <= set(data) <= {"format", "version", "setting", "conditions", "rows"}
            and isinstance(data["rows"], list)
        ),
    ),
)


def add(sub) -> None:
    p = sub.add_parser(
        "eval-lm",
        help="perplexity of every sub-network of an adaptive depth LM, naive layer removal, tokens/s per depth",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_flags(p)
    add_engine_flag(p)
    add_text_flags(p)
    p.add_argument("--skip", default="all", help="'all', or comma-separated configs such as TTFF,super,base")
    p.add_argument("--eval-tokens", type=positive_int, default=8192, help="held-out tokens evaluated")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per evaluation window")
    p.add_argument("-b", "--batch-size", type=positive_int, default=2, help="windows per forward pass")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (default: float32)")
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="the weights' dtype for perplexity and decoding speed (auto: bfloat16 where the CPU computes "
        "it natively, float32 elsewhere; give adn generate the same to use the table)",
    )
    p.add_argument(
        "--no-naive",
        dest="naive",
        action="store_false",
        help="with --checkpoint: do not evaluate naive removal (the base model with the same layers dropped)",
    )
    p.add_argument("--no-speed", dest="speed", action="store_false", help="do not measure decoding speed")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="greedy tokens decoded per speed measurement")
    p.add_argument("--prompt-tokens", type=positive_int, default=64, help="held-out tokens of the speed prompt")
    p.add_argument("--repeats", type=positive_int, default=1, help="speed: best of N runs")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON rows on stdout instead of a table (a depth "
        "table for adn generate --tokens-per-s when redirected to a file)",
    )
    p.add_argument(
        "--save-json",
        default=None,
        metavar="FILE",
        help="also write the rows to FILE as a depth table (ppl and tokens/s per depth, and how they were "
        "measured) for adn generate --depth-table FILE --tokens-per-s T (an existing FILE is replaced "
        "only if eval-lm wrote it, or with --overwrite)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --save-json FILE eval-lm did not write"
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..lm.checkpoint import apply_trained_state, base_network, read_lm_checkpoint
    from ..lm.corpus import load_corpus, token_stream, windows
    from ..lm.depth_table import FORMAT, VERSION, conditions
    from ..lm.engine import running_layers
    from ..lm.evaluate import decoding_speed, perplexity_table
    from ..lm.generate import engine_decodes
    from ..lm.precision import cast_weights, decoding_dtype, dtype_name

    save = None
    if args.save_json is not None:  # before anything is loaded: a wrong path costs nothing
        save = output_path(
            args.save_json,
            SAVED_ROWS,
            flag="--save-json",
            overwrite=args.overwrite,
            inputs=[("--checkpoint", args.checkpoint), ("--text", args.text)],
        )
    corpus = load_corpus(args.text, args.heldout_share)  # before the model: a missing corpus fails fast
    data = read_lm_checkpoint(args.checkpoint) if args.checkpoint else None
    stages, _ = planned_network(args, data["meta"] if data else None)
    if stages is not None:  # --skip checked before the (slow) load
        skip_configs(args.skip, stages)
    net, tokenizer = base_network(data["meta"], args.model, args.gguf_file) if data else fresh_network(args)
    dtype = decoding_dtype(args.dtype)
    cast_weights(net, dtype)
    configs = skip_configs(args.skip, net.num_stages)
    stream = token_stream(tokenizer, corpus.heldout, args.eval_tokens)
    held = windows(stream, min(args.seq_len, stream.numel()))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.amp else None
    naive = None
    if data is not None and args.naive:  # the base model's own layers dropped, before the trained tensors go in
        naive = perplexity_table(net, held, configs, args.batch_size, autocast, label="naive removal")
    if data is not None:
        apply_trained_state(net, data["model"], args.checkpoint)
    ppl = perplexity_table(net, held, configs, args.batch_size, autocast, label="perplexity")
    if data is None:
        naive = ppl  # not fine-tuned: every sub-network is the model with those layers dropped
    total_layers = len(running_layers(net, "super"))
    rows = []
    for config in configs:
        key = str(config)
        rows.append(
            {
                "skip": key,
                "layers": f"{len(running_layers(net, config))}/{total_layers}",
                "params": net.active_parameters(config) / 1e6,
                "ppl": ppl[key],
                "naive_ppl": naive[key] if naive else None,
            }
        )
    prompt = stream[: args.prompt_tokens][None]
    if args.speed:
        for row, config in zip(rows, configs):
            row["tokens_per_s"] = decoding_speed(
                net, prompt, args.new_tokens, config, args.repeats, engine=engine_choice(args)
            )
    _add_ratios(rows)
    what = (
        f"{args.checkpoint} (fine-tuned)"
        if data
        else f"{args.model or 'smollm2'} converted, not fine-tuned: naive removal = the sub-network"
    )
    setting = (
        f"{what}; held-out perplexity over {held.numel()} tokens of {corpus.description.split(':')[0]} in windows "
        f"of {held.shape[1]}, {dtype_name(dtype)} weights{', bfloat16 autocast' if args.amp else ''}"
        + (
            f"; tokens/s: greedy decoding of {args.new_tokens} tokens after a {prompt.shape[1]}-token prompt with "
            f"the KV cache, batch 1, best of {args.repeats}, {torch.get_num_threads()} threads"
            if args.speed
            else ""
        )
    )
    if save is not None:
        table = {
            "format": FORMAT,
            "version": VERSION,
            "setting": setting,
            "conditions": conditions(
                dtype_name(dtype),
                what,
                new_tokens=args.new_tokens if args.speed else None,
                prompt_tokens=prompt.shape[1] if args.speed else None,
                engine=engine_decodes(net, prompt.shape[1] + args.new_tokens, engine_choice(args))
                if args.speed
                else None,
            ),
            "rows": rows,
        }
        text = jsonout.dumps(table, indent=2) + "\n"
        atomic_write(save, lambda tmp: Path(tmp).write_text(text))
    if args.json:
        print(jsonout.dumps(rows, indent=2))
    else:
        print(setting)
        print(format_rows(rows))
    sys.stdout.flush()
    return 0


def _add_ratios(rows: list[dict]) -> None:
    reference = next((r for r in rows if set(r["skip"]) == {"F"}), None)
    if reference is None:
        return
    for row in rows:
        row["ppl_ratio"] = row["ppl"] / reference["ppl"]
        if "tokens_per_s" in row:
            row["speed_ratio"] = row["tokens_per_s"] / reference["tokens_per_s"]


def format_rows(rows: list[dict]) -> str:
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    cells = [[c[1] for c in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

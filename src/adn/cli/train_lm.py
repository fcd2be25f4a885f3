"""``adn train-lm``: Algorithm 1 for a decoder-only language model on a plain-text corpus."""

from __future__ import annotations

import argparse
import sys

from ..core.distill import FEATURE_KD_MODES
from ..lm.config import METHODS, TRAIN_MODES, LMTrainConfig
from ..utils import jsonout
from .common import positive_int
from .lm_flags import add_model_flags, add_text_flags, grouping


def add(sub) -> None:
    d = LMTrainConfig()
    p = sub.add_parser(
        "train-lm",
        help="train an adaptive depth language model (Algorithm 1 on text)",
        description="Convert a decoder-only LM (Llama layout: SmolLM2, Llama, Mistral, Qwen2) and train it "
        "with sub-path specialization: the super-net learns the next token, the base-net "
        "distils the super-net's token distributions and each stage's hidden states. "
        "Writes checkpoint.pt, log.jsonl and summary.json to --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_flags(p, checkpoint=False)
    p.add_argument(
        "--no-skip-aware-norm",
        dest="skip_aware_norm",
        action="store_false",
        help="ablation: no skip-aware RMSNorm twins",
    )
    add_text_flags(p)
    p.add_argument(
        "--max-train-tokens",
        type=positive_int,
        default=d.max_train_tokens,
        help="tokenize at most this many training tokens (windows are drawn from them at random)",
    )
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", default=d.output_dir, help="where checkpoint.pt and log.jsonl go")
    g.add_argument(
        "--train",
        default=d.train,
        choices=TRAIN_MODES,
        help="what trains: twins (skip-aware RMSNorm twins only), near-skipped (twins + the last shared "
        "layer and the skippable layers of each stage), all",
    )
    g.add_argument(
        "--method",
        default=d.method,
        choices=METHODS,
        help="adn: Algorithm 1 (the super-net learns the next token, the base-net distils it); alone: the "
        "baseline, the base-net (the model with the skippable layers removed) learning the next token by itself "
        "from the same tokens, the same parameters trainable",
    )
    g.add_argument("--steps", type=positive_int, default=d.steps, help="optimizer steps (the schedule's length)")
    g.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="MINUTES",
        help="stop (with a checkpoint and a final evaluation) after this many minutes",
    )
    g.add_argument("-b", "--batch-size", type=positive_int, default=d.batch_size, help="sequences per step")
    g.add_argument("--seq-len", type=positive_int, default=d.seq_len, help="tokens per training and evaluation window")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (warm-up, then cosine to lr/10)")
    g.add_argument(
        "--wd", "--weight-decay", dest="weight_decay", type=float, default=d.weight_decay, help="weight decay"
    )
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="steps of linear learning-rate warm-up")
    g.add_argument("--clip-grad-norm", type=float, default=d.clip_grad_norm, help="clip gradients to this norm")
    g.add_argument("--alpha", type=float, default=d.alpha, help="weight of the super-net's next-token loss")
    g.add_argument(
        "--base-ce",
        type=float,
        default=d.base_ce,
        metavar="W",
        help="a deviation from Algorithm 1: the base-net also learns the next token, adding W * CE to its "
        "distillation loss (0: the paper, the base-net learns from the super-net only)",
    )
    g.add_argument(
        "--temperature", type=float, default=d.temperature, help="distillation temperature (KL scaled by T^2)"
    )
    g.add_argument(
        "--feature-kd",
        default=d.feature_kd,
        choices=FEATURE_KD_MODES,
        help="stage hidden-state distillation: spatial (softmax over channels per token), pooled, none",
    )
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 autocast (default: on where the CPU computes bfloat16 natively)",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="seed of data order and initialization of new parameters")
    g.add_argument("--eval-every", type=positive_int, default=d.eval_every, help="held-out perplexity every N steps")
    g.add_argument("--eval-tokens", type=positive_int, default=d.eval_tokens, help="held-out tokens evaluated")
    g.add_argument("--save-every", type=positive_int, default=d.save_every, help="checkpoint every N steps")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue the run that wrote CHECKPOINT")
    g.add_argument("--overwrite", action="store_true", help="replace another run's files in --output-dir")
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=d.keep_checkpoints,
        metavar="K",
        help="keep the last K checkpoints as checkpoint-e0001-s<step>.pt beside checkpoint.pt "
        "(--keep-last is the layers kept out of every stage)",
    )
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..lm.train import train_lm

    cfg = LMTrainConfig(
        output_dir=args.output_dir,
        model=args.model,
        gguf_file=args.gguf_file,
        text=args.text,
        heldout_share=args.heldout_share,
        steps=args.steps,
        time_limit=args.time_limit,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        clip_grad_norm=args.clip_grad_norm,
        alpha=args.alpha,
        base_ce=args.base_ce,
        temperature=args.temperature,
        feature_kd=args.feature_kd,
        train=args.train,
        method=args.method,
        skip_aware_norm=args.skip_aware_norm,
        amp=args.amp,
        max_train_tokens=args.max_train_tokens,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        save_every=args.save_every,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        keep_checkpoints=args.keep_checkpoints,
        progress=args.progress,
        **grouping(args),
    )
    summary = train_lm(cfg)
    if args.json:
        print(jsonout.dumps(summary, indent=2))
    else:
        print(
            f"held-out perplexity after {summary['steps']} steps ({summary['stopped']}): super-net "
            f"{summary['ppl_super']:.3f}, base-net {summary['ppl_base']:.3f}; checkpoint: {summary['checkpoint']}"
        )
    sys.stdout.flush()
    return 0

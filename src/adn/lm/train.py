"""``adn train-lm``: Algorithm 1 (sub-path specialization) for language modelling.

Per batch of token windows, as for images (:func:`adn.train.adn_step`):

1. super-net forward + backward: ``alpha * CE(next token)``;
2. base-net forward + backward: ``(1 - alpha) * (KL(super || base) of every token's next-token distribution
   + sum over stages of KL(h_super^s || h_base^s))``, the super-net side detached. Stage outputs are hidden
   states; ``feature_kd="spatial"`` takes the softmax over channels at every token.

Two backward passes: the peak memory is that of one sub-network. The loss is
:class:`adn.distill.SubPathDistillationLoss` with tokens in place of images.

What trains (``train``): fine-tuning all 135M parameters of SmolLM2 on 2 CPU cores is slow, so by default
only what sits next to a skip does:

- ``twins``: the skip-aware twins alone (the RMSNorms the base-net uses in place of the shared layers' own);
  the super-net then has nothing to learn and runs without gradients (teacher only);
- ``near-skipped`` (default): the twins, the last shared layer of every stage and its skippable layers (the
  layers on both sides of each skip; the super-net keeps fitting the labels through them);
- ``all``: every parameter.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..utils import jsonout
from ..errors import CheckpointError
from ..utils.checkpoint_file import load_checkpoint
from ..convert.llama import convert_decoder
from ..core.distill import SubPathDistillationLoss
from ..training.precision import FLOAT32, Precision, native_bfloat16
from ..training.run_folder import check_writable, claim
from ..core.skip import SkipConfig
from .checkpoint import apply_trained_state, save_lm_checkpoint
from .config import LMTrainConfig
from .corpus import load_corpus, token_stream, training_batch, windows
from .evaluate import perplexity
from .model import describe, load_causal_lm

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


def trainable_names(net, mode: str) -> set[str]:
    """Names of the parameters that ``mode`` trains (module docstring)."""
    names = {name for name, _ in net.named_parameters()}
    twins = {name for name in names if ".twin." in name}
    if mode == "twins":
        return twins
    if mode == "all":
        return names
    ids = {id(p): name for name, p in net.named_parameters()}
    near = set()
    for stage in net.adn_stages:
        for module in [stage.shared[-1], *stage.skippable]:
            near.update(ids[id(p)] for p in module.parameters() if id(p) in ids)
    return twins | near


def lm_adn_step(net, input_ids: torch.Tensor, criterion: SubPathDistillationLoss, precision: Precision = FLOAT32,
                teacher_trains: bool = True) -> dict[str, float]:
    """One step of Algorithm 1 on a batch of token windows (without the optimizer update): gradients in
    ``.grad``, the network left at the depth it had. ``teacher_trains=False`` runs the super-net without
    gradients (nothing it uses is trained)."""
    n = net.num_stages
    inputs, targets = input_ids, input_ids[:, 1:].flatten()
    with net.capture_stage_outputs() as stage_outputs:
        with torch.set_grad_enabled(teacher_trains), precision.autocast():
            super_logits = net(input_ids=inputs, use_cache=False, skip=SkipConfig.super_net(n)).logits
            super_features = [h.detach() for h in stage_outputs]
            teacher_loss, terms = criterion.teacher_loss(super_logits[:, :-1].flatten(0, 1), targets)
        if teacher_trains:
            precision.backward(teacher_loss)  # frees the super-net's activations before the base-net runs
        super_logits = super_logits.detach()
        with precision.autocast():
            base_logits = net(input_ids=inputs, use_cache=False, skip=SkipConfig.base_net(n)).logits
            student_loss, student_terms = criterion.student_loss(
                base_logits.flatten(0, 1), list(stage_outputs), super_logits.flatten(0, 1), super_features)
        precision.backward(student_loss)
    terms.update(student_terms)
    terms["loss"] = teacher_loss.detach() + student_loss.detach()
    return {k: float(v) for k, v in terms.items()}


def learning_rate(cfg: LMTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``lr`` at ``steps`` (``step`` counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_lm(cfg: LMTrainConfig) -> dict:
    """Run ``adn train-lm``; returns the summary also written to ``summary.json``."""
    cfg.check()
    out = Path(cfg.output_dir)
    check_writable(out)
    corpus = load_corpus(cfg.text, cfg.heldout_share)
    base = describe(cfg.model, cfg.gguf_file)
    model, tokenizer = load_causal_lm(cfg.model, cfg.gguf_file)
    net = convert_decoder(model, layers_per_stage=cfg.layers_per_stage, skippable=cfg.skippable,
                          keep_first=cfg.keep_first, keep_last=cfg.keep_last, skip_aware_norm=cfg.skip_aware_norm)
    trained = trainable_names(net, cfg.train)
    if not trained:
        raise ValueError(f"--train {cfg.train} selects no parameter (no skip-aware twins with --no-skip-aware-norm?)")
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(name in trained)
    teacher_trains = any(p.requires_grad for name, p in net.named_parameters() if ".twin." not in name)

    stream = token_stream(tokenizer, corpus.train, cfg.max_train_tokens)
    heldout = windows(token_stream(tokenizer, corpus.heldout, cfg.eval_tokens), cfg.seq_len)
    amp = native_bfloat16("cpu") if cfg.amp is None else cfg.amp
    precision = Precision("cpu", amp=amp, dtype="bfloat16")
    criterion = SubPathDistillationLoss(alpha=cfg.alpha, temperature=cfg.temperature, feature_kd=cfg.feature_kd,
                                        channel_dim=-1)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    meta = {"base": base, "grouping": net.adn_info["grouping"], "skip_aware_norm": cfg.skip_aware_norm,
            "train": cfg.train, "stages": net.adn_info["stages"], "corpus": corpus.description,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite", "progress")}}

    step = 0
    if cfg.resume:
        step = _resume(cfg.resume, net, optimizer)
    lock = claim(out, cfg.resume, cfg.overwrite, log=_log)
    try:
        n_trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
        _log(f"training {base['model']} as an adaptive depth network: {net.num_stages} stages "
             f"({', '.join(s['name'] for s in net.adn_info['stages'])}; the last {cfg.skippable} layer(s) of each "
             f"skippable), {2 ** net.num_stages} sub-networks; --train {cfg.train}: {n_trained / 1e6:.2f}M of "
             f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters")
        _log(f"corpus: {corpus.description}; {stream.numel()} training tokens, {heldout.numel()} held-out tokens in "
             f"windows of {cfg.seq_len}; batch {cfg.batch_size} x {cfg.seq_len} tokens; {precision}; "
             f"{torch.get_num_threads()} threads" + (f"; resuming at step {step}" if step else ""))
        summary = _loop(cfg, net, stream, heldout, criterion, precision, optimizer, trained, meta, step, teacher_trains)
    finally:
        lock.release()
    (out / "summary.json").write_text(jsonout.dumps(summary, indent=2) + "\n")
    return summary


def _resume(path: str, net, optimizer) -> int:
    data = load_checkpoint(path)
    if data["meta"].get("task") != "causal-lm":
        raise CheckpointError(f"{path} is not a checkpoint of adn train-lm")
    apply_trained_state(net, data["model"], path)
    try:
        optimizer.load_state_dict(data["optimizer"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: its optimizer state does not fit this run ({error}); resume with the same "
                              f"--train and grouping options it was started with") from error
    return int(data["step"])


def _loop(cfg, net, stream, heldout, criterion, precision, optimizer, trained, meta, step, teacher_trains) -> dict:
    out = Path(cfg.output_dir)
    log_path = out / LOG
    started = time.monotonic()
    deadline = started + cfg.time_limit * 60 if cfg.time_limit else None
    trainable = [p for p in net.parameters() if p.requires_grad]
    n = net.num_stages

    def save(reason: str) -> None:
        save_lm_checkpoint(out / CHECKPOINT, net, trained, meta, optimizer=optimizer.state_dict(), step=step)
        _log(f"checkpoint: {out / CHECKPOINT} (step {step}, {reason})")

    def evaluate() -> dict:
        net.eval()
        with torch.no_grad():
            record = {f"ppl_{name}": perplexity(net, heldout, config, autocast=precision.autocast)
                      for name, config in (("super", SkipConfig.super_net(n)), ("base", SkipConfig.base_net(n)))}
        net.train()
        return record

    def append(record: dict) -> None:
        with open(log_path, "a") as handle:
            handle.write(jsonout.dumps(record) + "\n")

    first = evaluate() if step == 0 else None
    if first:
        append({"step": 0, **first})
        _log(f"step 0: held-out perplexity super {first['ppl_super']:.3f}, base {first['ppl_base']:.3f}")
    net.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train-lm", unit="step", file=sys.stderr, disable=not cfg.progress)
    stopped = "finished"
    try:
        while step < cfg.steps:
            if deadline is not None and time.monotonic() > deadline:
                stopped = f"time limit of {cfg.time_limit:g} min"
                break
            tick = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            batch = training_batch(stream, cfg.batch_size, cfg.seq_len, cfg.seed, step)
            optimizer.zero_grad(set_to_none=True)
            terms = lm_adn_step(net, batch, criterion, precision, teacher_trains)
            if not math.isfinite(terms["loss"]):
                raise ValueError(f"the loss became {terms['loss']} at step {step + 1}; lower --lr")
            if cfg.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad_norm)
            precision.step(optimizer)
            step += 1
            seconds = time.perf_counter() - tick
            record = {"step": step, **terms, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                      "tokens_per_second": batch.numel() / seconds}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record.update(evaluate())
                _log(f"step {step}: loss {terms['loss']:.4f}, held-out perplexity super {record['ppl_super']:.3f}, "
                     f"base {record['ppl_base']:.3f}")
            append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.3f}", s_per_step=f"{seconds:.1f}")
            if step % cfg.save_every == 0 and step < cfg.steps:
                save(f"every {cfg.save_every} steps")
    except KeyboardInterrupt:
        bar.close()
        save("interrupted")
        raise
    bar.close()
    final = evaluate()
    save(stopped)
    summary = {"steps": step, "stopped": stopped, "minutes": (time.monotonic() - started) / 60, **final,
               "checkpoint": str(out / CHECKPOINT)}
    _log(f"done ({stopped}) after {step} steps: held-out perplexity super {final['ppl_super']:.3f}, "
         f"base {final['ppl_base']:.3f}")
    return summary

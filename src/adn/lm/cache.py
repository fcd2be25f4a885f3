"""A KV cache bound to one depth of an adaptive depth language model.

What happens to the cache of a skipped layer: nothing. A skipped decoder layer is not executed, so it
neither reads nor writes its cache entry; in transformers 5.18 a ``DynamicCache`` made from the model's
config holds one lazily initialised layer per decoder layer, and a layer never called stays uninitialised
(``keys is None``). Two things follow:

- a cache belongs to the depth it was filled at. A layer that starts running later would attend to no past
  tokens, and the shared layers of a stage compute other keys and values once the stage's skip (and so its
  norms) changes. :class:`DepthCache` records the depth of its first forward pass and refuses any other
  (a ``ValueError``), instead of decoding garbage silently;
- ``DynamicCache.crop`` fails on an uninitialised layer (``TypeError: 'NoneType' object is not
  subscriptable``: what Hugging Face's assisted generation calls); :meth:`DepthCache.crop` crops the layers
  that ran and leaves the others empty.

``net.generate`` makes a plain DynamicCache for each call and keeps one depth for the whole call, so it is
correct at any depth (``with net.skipping("TTFF"): net.generate(...)``); pass a DepthCache as
``past_key_values`` to keep a cache across calls safely.
"""

from __future__ import annotations

import weakref

from transformers import DynamicCache

from ..core.skip import SkipConfig


class DepthMismatch(ValueError):
    """A cache filled at one depth was used at another."""


class DepthCache(DynamicCache):
    """``DynamicCache`` for ``net`` that remembers the depth it was filled at (first forward pass) and
    refuses to be read or written at any other."""

    def __init__(self, net):
        super().__init__(config=net.config)
        # A weak reference: a copy of the cache (deepcopy) must not copy the whole network with it.
        self._net = weakref.ref(net)
        self.depth: SkipConfig | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # Layer 0 runs in every sub-network (it is outside every stage or the first shared layer of the first
        # one), so each forward pass comes by here once, before any other layer touches the cache.
        if layer_idx == 0:
            depth = self._net().skip  # the depth of the running call (per-call skip= or skipping block included)
            if self.depth is None:
                self.depth = depth
            elif depth != self.depth:
                raise DepthMismatch(
                    f"this KV cache was filled by the sub-network {self.depth} and cannot serve {depth}: "
                    f"skipped layers have no entries and shared layers' keys and values depend on the "
                    f"depth. Use one cache per depth (adn.lm.cache.DepthCache(net)), or start a new one"
                )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (negative, as DynamicCache's) from every layer that ran."""
        if tokens_to_remove > 0:
            raise ValueError("DepthCache.crop takes the (negative) number of tokens to remove; use keep(n) to keep n")
        for layer in self.layers:
            if layer.is_initialized:
                layer.crop(tokens_to_remove)

    def keep(self, length: int) -> None:
        """Keep the first ``length`` tokens of every layer that ran."""
        for layer in self.layers:
            if layer.is_initialized and layer.get_seq_length() > length:
                layer.crop(length - layer.get_seq_length())

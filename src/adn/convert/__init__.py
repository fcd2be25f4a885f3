"""``adn.convert``: turn a residual network into an adaptive depth network, in place.

One mechanism, many architectures: an *adapter* only says where a model's stages are (which blocks,
in order) and which sub-modules of a block sit outside its residual branch; :func:`convert_stages`
does the rest for every architecture (split rule, skippable blocks, skip-aware twins).
"""

from __future__ import annotations

from .registry import (
    Adapter,
    DEFAULT_NORM_TYPES,
    StageSpec,
    convert,
    convert_stages,
    register_adapter,
    split_point,
    supported_families,
)

# Importing the adapters registers them.
from . import llama, mobilenet, resnet, swin, timm_models, vit  # noqa: E402,F401

__all__ = [
    "Adapter",
    "DEFAULT_NORM_TYPES",
    "StageSpec",
    "convert",
    "convert_stages",
    "register_adapter",
    "split_point",
    "supported_families",
]

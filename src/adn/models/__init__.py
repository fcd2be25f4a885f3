"""Model builders by name: adn's small models, torchvision's ResNet, MobileNetV2, ViT and Swin
families, and any timm model as ``timm/<name>``.

``build_model(name, num_classes, in_channels)`` returns a plain (not yet converted) model."""

from __future__ import annotations

import difflib

import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

from .small_resnet import SmallResNet, resnet20, resnet32, resnet44, resnet56, resnet110
from .small_transformers import mobilenet_v2_small, vit_small_images

SMALL_MODELS = {f.__name__: f for f in (resnet20, resnet32, resnet44, resnet56, resnet110)}
SMALL_MODELS["mobilenet_v2_small"] = mobilenet_v2_small
SMALL_MODELS["vit_small_images"] = vit_small_images
# Models whose builder must know the image size (a ViT's position embeddings do).
NEEDS_IMAGE_SIZE = {"vit_small_images"}
TORCHVISION_RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)
TORCHVISION_MODELS = TORCHVISION_RESNETS + (
    "mobilenet_v2",
    "vit_b_16",
    "vit_b_32",
    "vit_l_16",
    "vit_l_32",
    "vit_h_14",
    "swin_t",
    "swin_s",
    "swin_b",
    "swin_v2_t",
    "swin_v2_s",
    "swin_v2_b",
)
# Stochastic depth rates of the adaptive depth networks where they differ from torchvision's: the authors'
# ADN Swin-T trains with 0.1 (torchvision's swin_t: 0.2); swin_v2_t, of the same depths, follows it.
ADN_STOCHASTIC_DEPTH = {"swin_t": 0.1, "swin_v2_t": 0.1}


def _num_outputs(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def _timm_model(name: str, num_classes: int, in_channels: int, weights: str | None, **kwargs) -> nn.Module:
    """Any timm model by name (``timm/convnext_tiny``); ``weights`` set means timm's pretrained
    weights (downloaded from the Hugging Face hub by timm)."""
    try:
        import timm
    except ImportError as error:
        raise ValueError(f"model timm/{name} needs timm: pip install 'adn[timm]'") from error
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ValueError(f"timm has no model {name!r}." + (f" Did you mean {', '.join(close)}?" if close else ""))
    return timm.create_model(name, pretrained=bool(weights), num_classes=num_classes, in_chans=in_channels, **kwargs)


def set_stochastic_depth(model: nn.Module, rate: float) -> None:
    """Give a torchvision Swin the stochastic depth ``rate``, in place. Its builders fix the rate (swin_t:
    0.2) and let it grow linearly with the block index up to the last block's, so every block's
    probability is scaled by the same factor."""
    layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    built = max((m.p for m in layers), default=0.0)
    for layer in layers:
        layer.p = layer.p * (rate / built) if built > 0 else 0.0


def available_models() -> list[str]:
    return list(SMALL_MODELS) + list(TORCHVISION_MODELS) + ["timm/<any timm model of a supported family>"]


def _check_weights_name(name: str, weights) -> None:
    """torchvision raises a bare KeyError for a weights name it does not know."""
    enum = torchvision.models.get_model_weights(name)
    known = list(dict.fromkeys(["DEFAULT", *enum.__members__]))  # (DEFAULT is also an alias in the enum)
    if not isinstance(weights, str) or weights.replace(enum.__name__ + ".", "") not in known:
        raise ValueError(
            f"--weights {weights}: {name} has no such weights; choose one of {', '.join(known)} "
            f"(DEFAULT: the best available)"
        )


def build_model(
    name: str, num_classes: int = 1000, in_channels: int = 3, weights: str | None = None, **kwargs
) -> nn.Module:
    """Build an unconverted model by name. ``weights`` names torchvision weights (e.g. ``"DEFAULT"``),
    downloaded by torchvision when needed (needs the internet the first time)."""
    known = name in SMALL_MODELS or name in TORCHVISION_MODELS or name.startswith("timm/")
    if "width" in kwargs and known and not (name in SMALL_MODELS and name.startswith("resnet")):
        raise ValueError(
            f"--width applies to the small ResNets ({', '.join(n for n in SMALL_MODELS if n.startswith('resnet'))}), "
            f"not to {name}"
        )
    if name in SMALL_MODELS:
        if weights:
            raise ValueError(f"{name} has no pretrained weights; omit --weights")
        return SMALL_MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    if name in TORCHVISION_MODELS:
        if weights:
            _check_weights_name(name, weights)
        if name not in TORCHVISION_RESNETS and in_channels != 3:
            raise ValueError(
                f"{name} takes 3-channel images; in_channels={in_channels} is supported for ResNets "
                f"({', '.join(SMALL_MODELS)}, {', '.join(TORCHVISION_RESNETS)})"
            )
        if weights and name not in TORCHVISION_RESNETS:
            model = torchvision.models.get_model(name, weights=weights, **kwargs)
            classes = _num_outputs(model)
            if classes != num_classes:
                raise ValueError(
                    f"{name} weights {weights} predict {classes} classes, not {num_classes}; "
                    f"replacing the head is supported for ResNets so far"
                )
            if name in ADN_STOCHASTIC_DEPTH:
                set_stochastic_depth(model, ADN_STOCHASTIC_DEPTH[name])
            return model
        if weights:
            model = torchvision.models.get_model(name, weights=weights, **kwargs)
            if num_classes != model.fc.out_features:
                model.fc = nn.Linear(model.fc.in_features, num_classes)
        else:
            model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
        if name in ADN_STOCHASTIC_DEPTH:
            set_stochastic_depth(model, ADN_STOCHASTIC_DEPTH[name])
        if in_channels != 3:
            old = model.conv1
            model.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        return model
    if name.startswith("timm/"):
        return _timm_model(name[len("timm/") :], num_classes, in_channels, weights, **kwargs)
    close = difflib.get_close_matches(name, available_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(available_models())}")


__all__ = ["SmallResNet", "available_models", "build_model", *SMALL_MODELS]

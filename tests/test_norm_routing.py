"""Which norm serves each sub-network: the norm itself or its skip-aware twin, for every architecture adn
converts, pinned against the rules of DESIGN.md (restated below, independently of the adapters).

For every sub-network, a forward pass records which twins normalized (hooks on the twins) and which
stochastic-depth layers ran, and ``net.subnet(config)`` shows which norm the standalone module kept. Both
must match the routing the rules give. The rules:

- split: a stage of n blocks shares its first ``min(n - 1, ceil(n / 2))``; stages of one block are not stages;
- the norms in the residual branch of a shared block switch with its stage (not a shortcut's norm);
- a layer that opens a stage (Swin's patch merging, ConvNeXt's downsampling) switches with that stage;
- MobileNetV2: stem and first block with stage 1, last block and final 1x1 conv with the last stage;
- ViT: stages of 3 blocks, the last one skippable;
- Swin: shared blocks drop no paths (stochastic depth) while their stage skips.

Inputs are tiny (32 pixels: the routing does not depend on the image size) so the 16 or 32 sub-networks
of each full-size model run in seconds.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

import adn
from adn.core.layers import SkipAwareNorm

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def shared_count(num_blocks: int) -> int:
    return min(num_blocks - 1, math.ceil(num_blocks / 2))


def norms_under(model: nn.Module, prefix: str, exclude: str | None = None) -> list[str]:
    """Names of the norms inside sub-module ``prefix`` (without those under ``prefix.<exclude>``)."""
    found = []
    for name, module in model.get_submodule(prefix).named_modules():
        if isinstance(module, NORM_TYPES) and not (exclude and (name == exclude or name.startswith(exclude + "."))):
            found.append(f"{prefix}.{name}" if name else prefix)
    return found


# ----- the rules: {norm name: index of the stage that switches it} -------------------------------------------
def resnet_routing(model: nn.Module) -> dict[str, int]:
    routing, stage = {}, 0
    for index in range(1, 5):
        layer = getattr(model, f"layer{index}", None)
        if layer is None or len(layer) < 2:
            continue
        for block in range(shared_count(len(layer))):
            for name in norms_under(model, f"layer{index}.{block}", exclude="downsample"):
                routing[name] = stage
        stage += 1
    return routing


def mobilenet_routing(model: nn.Module, block_names: list[list[str]], before: list[str], after: list[str]) -> dict:
    """``block_names``: the blocks of each row of the inverted-residual setting; rows of >= 2 blocks are
    the stages; ``before`` / ``after``: what switches with the first / last stage."""
    routing, stage = {}, 0
    for row in block_names:
        if len(row) < 2:
            continue
        for block in row[: shared_count(len(row))]:
            routing.update({name: stage for name in norms_under(model, block)})
        stage += 1
    for prefix in before:
        routing.update({name: 0 for name in norms_under(model, prefix)})
    for prefix in after:
        routing.update({name: stage - 1 for name in norms_under(model, prefix)})
    return routing


def torchvision_mobilenet_routing(model: nn.Module) -> dict[str, int]:
    rows, start = [], 1  # features: 0 = stem, then the blocks of each row (n per row: torchvision's setting)
    for n in (1, 2, 3, 4, 3, 3, 1):
        rows.append([f"features.{start + i}" for i in range(n)])
        start += n
    return mobilenet_routing(model, rows, before=["features.0", "features.1"], after=["features.17", "features.18"])


def timm_mobilenet_routing(model: nn.Module) -> dict[str, int]:
    rows = [[f"blocks.{row}.{i}" for i in range(len(group))] for row, group in enumerate(model.blocks)]
    return mobilenet_routing(model, rows, before=["bn1", "blocks.0"], after=[f"blocks.{len(rows) - 1}", "bn2"])


def vit_routing(model: nn.Module, blocks: str) -> dict[str, int]:
    layers = list(model.get_submodule(blocks).named_children())
    return {
        name: index // 3
        for index, (child, _) in enumerate(layers)
        if index % 3 != 2
        for name in norms_under(model, f"{blocks}.{child}")
    }


def swin_routing(model: nn.Module) -> dict[str, int]:
    """features: 0 = patch embedding, 1/3/5/7 = stages, 2/4/6 = the patch mergings opening stages 1-3."""
    routing = {}
    for stage, index in enumerate((1, 3, 5, 7)):
        for block in range(shared_count(len(model.features[index]))):
            for name in norms_under(model, f"features.{index}.{block}"):
                routing[name] = stage
        if stage > 0:
            routing.update({name: stage for name in norms_under(model, f"features.{index - 1}")})
    return routing


def convnext_routing(model: nn.Module) -> dict[str, int]:
    routing = {}
    for stage, block_stage in enumerate(model.stages):
        for block in range(shared_count(len(block_stage.blocks))):
            routing.update({name: stage for name in norms_under(model, f"stages.{stage}.blocks.{block}")})
        if stage > 0:
            routing.update({name: stage for name in norms_under(model, f"stages.{stage}.downsample")})
    return routing


def _tv(name: str, **kwargs):
    return lambda: adn.build_model(name, num_classes=10, **kwargs)


def _timm(name: str, **kwargs):
    return lambda: pytest.importorskip("timm").create_model(name, num_classes=10, **kwargs)


ARCHITECTURES = {  # builder, input size, rule, stages
    "resnet20": (_tv("resnet20", width=4), 32, resnet_routing, 3),
    "resnet56": (_tv("resnet56", width=4), 32, resnet_routing, 3),
    "resnet18": (_tv("resnet18"), 32, resnet_routing, 4),
    "resnet50": (_tv("resnet50"), 32, resnet_routing, 4),
    "mobilenet_v2": (_tv("mobilenet_v2"), 32, torchvision_mobilenet_routing, 5),
    "vit_b_16": (_tv("vit_b_16", image_size=32), 32, lambda m: vit_routing(m, "encoder.layers"), 4),
    "swin_t": (_tv("swin_t"), 32, swin_routing, 4),
    "swin_v2_t": (_tv("swin_v2_t"), 32, swin_routing, 4),
    "timm/resnet18": (_timm("resnet18"), 32, resnet_routing, 4),
    "timm/convnext_atto": (_timm("convnext_atto"), 32, convnext_routing, 4),
    "timm/mobilenetv2_050": (_timm("mobilenetv2_050"), 32, timm_mobilenet_routing, 5),
    "timm/deit_tiny": (
        _timm("deit_tiny_patch16_224", img_size=32, patch_size=8),
        32,
        lambda m: vit_routing(m, "blocks"),
        4,
    ),
}


# ----- what the network does -----------------------------------------------------------------------------------
class Recorder:
    """Hooks on every twin (recording the norm whose twin ran) and on torchvision's stochastic-depth layers
    (recording those that really ran, not the identity while their stage skips)."""

    def __init__(self, net: nn.Module, monkeypatch):
        self.twins_used: set[str] = set()
        self.drop_paths_run: set[str] = set()
        self.names = {module: name for name, module in net.named_modules()}
        for name, module in net.named_modules():
            if isinstance(module, SkipAwareNorm):
                module.twin.register_forward_hook(lambda *_, name=name: self.twins_used.add(name))
        original = StochasticDepth.forward
        recorder = self

        def forward(layer, x):
            recorder.drop_paths_run.add(recorder.names.get(layer, "?"))
            return original(layer, x)

        monkeypatch.setattr(StochasticDepth, "forward", forward)

    def run(self, net: nn.Module, x: torch.Tensor, config) -> tuple[set[str], set[str]]:
        self.twins_used.clear()
        self.drop_paths_run.clear()
        with torch.no_grad():
            net(x, skip=config)
        return set(self.twins_used), set(self.drop_paths_run)


def subnet_routing(net: nn.Module, sub: nn.Module, candidates) -> set[str]:
    """The norms whose twin the standalone sub-network ``sub`` kept (it shares tensors with ``net``)."""
    kept = set()
    for name in candidates:
        norm = net.get_submodule(name)
        weight = next(iter(norm.twin.parameters()), None)
        if weight is None:
            weight = next(iter(norm.twin.buffers()))
        try:
            resolved = sub.get_submodule(name)
        except AttributeError:  # in a block the sub-network removed
            continue
        if any(t is weight for t in list(resolved.parameters()) + list(resolved.buffers())):
            kept.add(name)
    return kept


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_sub_network_uses_the_norms_the_rules_give(arch, monkeypatch):
    builder, size, rule, stages = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = builder().eval()
    routing = rule(model)
    # Swin's stochastic-depth layers, each with its stage (features.1/3/5/7 -> 0/1/2/3)
    drop_path_stage = {
        name: int(re.match(r"features\.(\d+)\.", name)[1]) // 2
        for name, m in model.named_modules()
        if isinstance(m, StochasticDepth)
    }

    net = adn.convert(model).eval()
    assert net.num_stages == stages
    twinned = {name for name, m in net.named_modules() if isinstance(m, SkipAwareNorm)}
    assert twinned == set(routing), (
        f"norms with a twin that the rules do not give: {sorted(twinned - set(routing))[:5]}; "
        f"norms the rules give a twin that have none: {sorted(set(routing) - twinned)[:5]}"
    )
    recorder = Recorder(net, monkeypatch)
    x = torch.randn(1, 3, size, size)
    for config in adn.SkipConfig.all(stages):
        expected = {name for name, stage in routing.items() if config[stage]}
        twins, drop_paths = recorder.run(net, x, config)
        # norms in skipped blocks do not run: compare where they can
        assert twins == expected, (
            f"{arch} {config}: twins used where the rules say no: {sorted(twins - expected)[:4]}; "
            f"norms used where the rules say twin: {sorted(expected - twins)[:4]}"
        )
        sub = net.subnet(config)
        assert subnet_routing(net, sub, routing) == expected, f"{arch} {config}: subnet() resolved other norms"
        # Swin: stochastic depth runs in the stages that do not skip; a skipping stage's shared blocks drop no paths
        expected_drop_paths = {name for name, stage in drop_path_stage.items() if not config[stage]}
        assert drop_paths == expected_drop_paths, f"{arch} {config}: {sorted(drop_paths ^ expected_drop_paths)[:4]}"
        kept = {name for name, m in sub.named_modules() if isinstance(m, StochasticDepth)}
        assert kept == expected_drop_paths, f"{arch} {config}: subnet() kept {sorted(kept ^ expected_drop_paths)[:4]}"


def test_swin_t_stochastic_depth_rate_is_the_authors():
    rates = [m.p for m in adn.build_model("swin_t", num_classes=10).modules() if isinstance(m, StochasticDepth)]
    assert max(rates) == pytest.approx(0.1) and rates[0] == 0.0
    assert rates == sorted(rates)  # still growing linearly with depth, as torchvision's
    rates_v2 = [m.p for m in adn.build_model("swin_v2_t", num_classes=10).modules() if isinstance(m, StochasticDepth)]
    assert max(rates_v2) == pytest.approx(0.1)

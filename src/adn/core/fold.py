"""Fold BatchNorm into the preceding convolution, for inference.

``fold_batch_norms(module)`` traces the module with ``torch.fx`` and replaces every
``Conv2d -> BatchNorm2d`` pair (the convolution's output used only by the norm) with one convolution
whose weights and bias absorb the norm's running statistics and affine parameters
(``torch.nn.utils.fusion.fuse_conv_bn_eval``). The result is a ``GraphModule`` with new weight
tensors; the input module is left untouched."""

from __future__ import annotations

import copy

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batch_norms(module: nn.Module) -> fx.GraphModule:
    module = copy.deepcopy(module).eval()
    graph = fx.symbolic_trace(module)
    modules = dict(graph.named_modules())
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (
            not isinstance(source, fx.Node)
            or source.op != "call_module"
            or not isinstance(modules[source.target], nn.Conv2d)
            or len(source.users) != 1
        ):
            continue
        norm = modules[node.target]
        if not norm.track_running_stats:
            continue
        fused = fuse_conv_bn_eval(modules[source.target], norm)
        _replace(graph, source.target, fused)
        modules[source.target] = fused
        node.replace_all_uses_with(source)
        graph.graph.erase_node(node)
    graph.graph.lint()
    graph.delete_all_unused_submodules()
    graph.recompile()
    return graph


def _replace(root: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, new)


def count_batch_norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


__all__ = ["count_batch_norms", "fold_batch_norms"]

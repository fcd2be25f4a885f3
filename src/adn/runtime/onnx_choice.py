"""Conditionals for the switchable ONNX file, built from one flat trace instead of traced ``torch.cond`` branches.

``torch.cond`` keeps a skipped part out of the computation, but the exporter pays for it: Dynamo traces every
branch, and the decompositions trace them again (ResNet-50, 1 thread: 11.8 s to export the switchable file
that way against 6.1 s from one flat trace on a 2-core Intel Xeon; docs/benchmarks.md). Here the network is
traced once, with every part run and each choice marked by ``adn::choose(flag, skipped, run)``
(:func:`traced_choice`, set as :data:`adn.core.layers.TRACED_CHOICE`).
The exporter translates the mark to an ``adn.Choose`` node (:func:`translations`); :func:`choices_to_if` then
moves the nodes that only the ``run`` input needs into the ``else`` branch of an ONNX ``If`` on ``flag``, whose
``then`` branch passes ``skipped`` through. The file keeps no ``adn`` node: a skipped part is not executed, and
the file loads anywhere ONNX does.
"""

from __future__ import annotations

import torch

CHOOSE_DOMAIN = "adn"
CHOOSE_OP = "Choose"


@torch.library.custom_op("adn::choose", mutates_args=())
def choose(flag: torch.Tensor, skipped: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """``skipped`` where ``flag`` is set, else ``run``: the meaning of the mark, for a flat program run in
    PyTorch (the exported file computes only the chosen one)."""
    return torch.where(flag, skipped, run)


@choose.register_fake
def _choose_shape(flag: torch.Tensor, skipped: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(run)


def traced_choice(flag: torch.Tensor, skipped, run, x: torch.Tensor) -> torch.Tensor:
    """A :data:`adn.core.layers.TRACED_CHOICE`: run both sides on ``x`` and mark the choice between them."""
    return choose(flag, skipped(x), run(x))


def translations() -> dict:
    """The ``custom_translation_table`` for ``torch.onnx.export``: ``adn::choose`` becomes an ``adn.Choose``
    node (its schema registered with ``onnx`` on first use), for :func:`choices_to_if` to replace."""
    import onnx
    import onnxscript

    if not onnx.defs.has(CHOOSE_OP, CHOOSE_DOMAIN):
        parameter = onnx.defs.OpSchema.FormalParameter
        onnx.defs.register_schema(
            onnx.defs.OpSchema(
                CHOOSE_OP,
                CHOOSE_DOMAIN,
                1,
                doc="adn's mark of a skippable part, replaced by an If before the file is written",
                inputs=[parameter("flag", "B"), parameter("skipped", "T"), parameter("run", "T")],
                outputs=[parameter("output", "T")],
                type_constraints=[
                    ("B", ["tensor(bool)"], "the stage's skip flag"),
                    ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "activations"),
                ],
            )
        )
    domain = onnxscript.values.Opset(CHOOSE_DOMAIN, 1)

    def to_choose(flag, skipped, run):
        return domain.Choose(flag, skipped, run)

    return {torch.ops.adn.choose.default: to_choose}


def choices_to_if(model) -> int:
    """Replace each ``adn.Choose(flag, skipped, run)`` node of ``model``'s graph (an ``onnx_ir.Model``) by an ``If``
    on ``flag``: ``then`` passes ``skipped`` through, ``else`` holds every node whose outputs only ``run``
    needs (nodes also needed elsewhere stay outside and are read from the outer graph). Marks nested in
    others come first in graph order, so an inner ``If`` moves into its outer branch whole. Returns how many
    were replaced; the model keeps no ``adn`` node or opset."""
    import onnx_ir as ir

    graph = model.graph
    marks = [node for node in graph if node.domain == CHOOSE_DOMAIN and node.op_type == CHOOSE_OP]
    for number, mark in enumerate(marks):
        flag, skipped, run = mark.inputs
        nodes = list(graph)
        before = nodes[: nodes.index(mark)]
        inside: set[int] = set()
        for node in reversed(before):  # consumers before producers
            uses = [use for output in node.outputs for use in output.uses()]
            if uses and all((use.node is mark and use.idx == 2) or id(use.node) in inside for use in uses):
                inside.add(id(node))
        branch_nodes = [node for node in before if id(node) in inside]
        for node in branch_nodes:
            graph.remove(node)
        # A branch output must be computed in the branch (ONNX Runtime refuses an outer value returned as is).
        then_output = _identity(ir, skipped, f"choice{number}_skipped")
        then_branch = ir.Graph([], [then_output.outputs[0]], nodes=[then_output], name=f"choice{number}_skipped")
        if run.producer() is None or id(run.producer()) not in inside:
            passed = _identity(ir, run, f"choice{number}_run")
            branch_nodes.append(passed)
            run = passed.outputs[0]
        else_branch = ir.Graph([], [run], nodes=branch_nodes, name=f"choice{number}_run")
        conditional = ir.node(
            "If",
            [flag],
            {"then_branch": then_branch, "else_branch": else_branch},
            num_outputs=1,
            name=f"choice{number}",
        )
        result = mark.outputs[0]
        output = conditional.outputs[0]
        output.shape, output.type = result.shape, result.type
        graph.insert_before(mark, conditional)
        for use in list(result.uses()):
            use.node.replace_input_with(use.idx, output)
        for index, value in enumerate(graph.outputs):
            if value is result:
                graph.outputs[index] = output
        graph.remove(mark)
        output.name = result.name
    graph.opset_imports.pop(CHOOSE_DOMAIN, None)
    model.opset_imports.pop(CHOOSE_DOMAIN, None)
    return len(marks)


def _identity(ir, value, name: str):
    node = ir.node("Identity", [value], name=name)
    node.outputs[0].name = name
    node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
    return node

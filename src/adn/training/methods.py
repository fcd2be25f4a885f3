"""One training step per method, for a classifier: Algorithm 1 and the paper's baselines.

- ``adn``: super-net forward + backward (alpha * CE), then base-net forward + backward
  ((1 - alpha) * KL terms against the detached super-net). Two backward passes, so the peak memory
  is that of one sub-network; the gradients equal those of the paper's single loss.
- ``joint`` (ablation without specialization): (CE(super) + CE(base)) / 2, also in two passes.
- ``individual`` (baseline): plain training of one fixed sub-network.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..core.distill import SubPathDistillationLoss
from ..core.layers import SkipAwareNorm
from ..core.skip import SkipConfig
from .precision import FLOAT32, Precision

METHODS = ("adn", "joint", "individual")


@contextlib.contextmanager
def frozen_running_stats(norms: list[nn.Module]):
    """Batch norms keep normalizing with batch statistics but do not update their running statistics
    (momentum 0 leaves them unchanged)."""
    saved = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, saved):
            norm.momentum = momentum


def single_norms(net: nn.Module) -> list[nn.Module]:
    """Batch norms with no skip-aware twin (the stem's, the shortcut projections', the head's) and
    that are not twins themselves: each serves every sub-network with one set of running statistics."""
    twins = {id(m.twin) for m in net.modules() if isinstance(m, SkipAwareNorm)}
    return [
        m
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not isinstance(m, SkipAwareNorm)
        and id(m) not in twins
        and m.momentum is not None
    ]


def adn_step(
    net,
    images,
    targets,
    criterion: SubPathDistillationLoss,
    bn_stats_from: str = "super",
    precision: Precision = FLOAT32,
) -> dict:
    """One step of Algorithm 1 (without the optimizer update); leaves gradients in ``.grad`` and the
    network at the depth it had. ``precision``: autocast and loss scaling (``--amp``)."""
    n = net.num_stages
    with net.skipping(net.skip), net.capture_stage_outputs() as stage_outputs:
        net.skip = SkipConfig.super_net(n)
        with precision.autocast():
            super_logits = net(images)
            super_features = [h.detach() for h in stage_outputs]
            teacher_loss, terms = criterion.teacher_loss(super_logits, targets)
        precision.backward(teacher_loss)  # frees the super-net's activations before the base-net runs
        super_logits = super_logits.detach()

        net.skip = SkipConfig.base_net(n)
        freeze = single_norms(net) if bn_stats_from == "super" else []
        with frozen_running_stats(freeze), precision.autocast():
            base_logits = net(images)
            student_loss, student_terms = criterion.student_loss(
                base_logits, list(stage_outputs), super_logits, super_features, targets
            )
        precision.backward(student_loss)
    terms.update(student_terms)
    terms["loss"] = teacher_loss.detach() + student_loss.detach()
    return {"terms": _floats(terms), "logits": {"super": super_logits, "base": base_logits.detach()}}


def _floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device-to-host copy (one CUDA synchronisation) for all loss terms of a step."""
    keys = list(terms)
    values = torch.stack([terms[k].float() for k in keys]).tolist()
    return dict(zip(keys, values))


def joint_step(net, images, targets, criterion: nn.Module, precision: Precision = FLOAT32) -> dict:
    n = net.num_stages
    terms, logits = {}, {}
    for name, config in (("super", SkipConfig.super_net(n)), ("base", SkipConfig.base_net(n))):
        with precision.autocast():
            output = net(images, skip=config)
            ce = criterion(output, targets)
        precision.backward(0.5 * ce)
        terms[f"ce_{name}"] = ce.detach()
        logits[name] = output.detach()
    terms["loss"] = 0.5 * (terms["ce_super"] + terms["ce_base"])
    return {"terms": _floats(terms), "logits": logits}


def individual_step(net, images, targets, criterion: nn.Module, precision: Precision = FLOAT32) -> dict:
    with precision.autocast():
        output = net(images)  # at the depth fixed by net.skip
        loss = criterion(output, targets)
    precision.backward(loss)
    return {"terms": _floats({"loss": loss.detach()}), "logits": {str(net.skip): output.detach()}}

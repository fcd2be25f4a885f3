"""Algorithm 1's objective (sub-path specialization) as a reusable module.

    loss = alpha * CE(y, y_super)
           + (1 - alpha) * ( sum_s KL(h_super^s || h_base^s) + KL(y_super || y_base) )
           + base_ce * CE(y, y_base)          (base_ce = 0 in the paper; an option for ablations)

The super-net is the teacher: its side of every KL term is detached, so the KL terms train only the
base-net path. That makes the loss separable into a *teacher* part (depends on the super-net forward)
and a *student* part (depends on the base-net forward), which is what lets the trainer run two
forward/backward passes with the peak memory of one sub-network.

Feature distillation turns a stage output into distributions over channels:
- ``spatial``: softmax over channels at every spatial position / token (the paper's wording:
  distributions "for every spatial dimension"); KL averaged over positions and images.
- ``pooled``: global-average-pool each image's stage output to one vector, softmax over channels (the
  authors' public code).
- ``none``: logits distillation only.
Every KL uses temperature T and is scaled by T^2 so gradients keep their magnitude as T changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_KD_MODES = ("spatial", "pooled", "none")


def distribution_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float, dim: int = -1
) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, the distributions taken along ``dim`` and the KL averaged
    over every other index (batch, positions). Works in place of the layout: no transposed copies."""
    teacher, student = teacher_logits.detach().float(), student_logits.float()
    if temperature != 1.0:
        teacher, student = teacher / temperature, student / temperature
    log_p_teacher = F.log_softmax(teacher, dim=dim)
    log_p_student = F.log_softmax(student, dim=dim)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
    distributions = log_p_student.numel() // log_p_student.shape[dim]
    return kl / distributions * temperature**2


def feature_kl(
    teacher: torch.Tensor, student: torch.Tensor, mode: str = "spatial", temperature: float = 1.0, channel_dim: int = 1
) -> torch.Tensor:
    """KL between a super-net stage output (teacher) and a base-net stage output (student)."""
    if teacher.shape != student.shape:
        raise ValueError(
            f"stage outputs differ in shape: super-net {tuple(teacher.shape)} vs base-net "
            f"{tuple(student.shape)}; a skippable part must preserve its stage's output shape"
        )
    if mode == "none":
        return student.new_zeros((), dtype=torch.float32)
    if mode == "pooled":
        channel_dim %= teacher.dim()
        positions = [d for d in range(1, teacher.dim()) if d != channel_dim]
        if positions:
            teacher, student = teacher.mean(positions), student.mean(positions)
        return distribution_kl(teacher, student, temperature, dim=1)
    if mode != "spatial":
        raise ValueError(f"feature KD mode must be one of {FEATURE_KD_MODES}, got {mode!r}")
    return distribution_kl(teacher, student, temperature, dim=channel_dim)


class SubPathDistillationLoss(nn.Module):
    """The paper's loss. Use :meth:`teacher_loss` and :meth:`student_loss` for the two-pass trainer,
    or call the module for the whole loss at once; both give the same gradients.

    Args:
        alpha: weight of the super-net's task loss (paper: 0.5).
        temperature: softmax temperature T of every KL term.
        feature_kd: ``spatial`` (default), ``pooled`` or ``none`` — see the module docstring.
        label_smoothing: of the super-net's cross-entropy.
        channel_dim: channel dimension of the stage outputs (1 for NCHW feature maps).
        base_ce: weight of a cross-entropy on the labels for the base-net (0: the paper, where the
            base-net learns from the super-net only). A deviation from Algorithm 1, for ablations.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 1.0,
        feature_kd: str = "spatial",
        label_smoothing: float = 0.0,
        channel_dim: int = 1,
        base_ce: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= base_ce <= 10.0:
            raise ValueError(f"base_ce (the base-net's label-loss weight) must be in [0, 10], got {base_ce}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if feature_kd not in FEATURE_KD_MODES:
            raise ValueError(f"feature_kd must be one of {FEATURE_KD_MODES}, got {feature_kd!r}")
        self.alpha, self.temperature, self.feature_kd, self.base_ce = alpha, temperature, feature_kd, base_ce
        self.channel_dim = channel_dim
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    # Loss terms are returned as detached tensors (not floats): reading a CUDA value forces a
    # synchronisation, which the trainer does once per step, not once per term.
    def teacher_loss(
        self, super_logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = self.criterion(super_logits, target)
        return self.alpha * ce, {"ce_super": ce.detach()}

    def student_loss(
        self,
        base_logits: torch.Tensor,
        base_features: list[torch.Tensor],
        super_logits: torch.Tensor,
        super_features: list[torch.Tensor],
        target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(base_features) != len(super_features):
            raise ValueError(f"got {len(super_features)} super-net and {len(base_features)} base-net stage outputs")
        kd_features = base_logits.new_zeros((), dtype=torch.float32)
        for teacher, student in zip(super_features, base_features):
            kd_features = kd_features + feature_kl(
                teacher, student, self.feature_kd, self.temperature, self.channel_dim
            )
        kd_logits = distribution_kl(super_logits, base_logits, self.temperature)
        loss = (1.0 - self.alpha) * (kd_features + kd_logits)
        terms = {"kd_features": kd_features.detach(), "kd_logits": kd_logits.detach()}
        if self.base_ce:
            if target is None:
                raise ValueError("base_ce > 0 needs the targets: pass target= to student_loss")
            ce = self.criterion(base_logits, target)
            loss = loss + self.base_ce * ce
            terms["ce_base"] = ce.detach()
        return loss, terms

    def forward(self, super_logits, base_logits, target, super_features=(), base_features=()):
        teacher, t_terms = self.teacher_loss(super_logits, target)
        student, s_terms = self.student_loss(
            base_logits, list(base_features), super_logits, list(super_features), target
        )
        total = teacher + student
        return total, {**t_terms, **s_terms, "loss": total.detach()}

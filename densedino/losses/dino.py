"""DINO's self-distillation loss on image-level (CLS) outputs.

The loss is pure: `forward` never touches the center. The training step calls `update_center`
with the teacher's raw outputs after computing the loss (as DINO does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedino.checks import check_temperature
from densedino.losses.centering import Center

__all__ = [
    "CenteredLoss",
    "DINOLoss",
    "default_pairs",
    "normalised_entropy",
    "soft_cross_entropy",
    "teacher_probs",
]


def teacher_probs(teacher_out: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Centered, sharpened and detached teacher distribution softmax((t - c) / tau_t), in
    float32 (the center is float32, so bf16 outputs promote)."""
    # In place after the subtraction: one [..., C] tensor less per call (C = 65536).
    logits = (teacher_out.detach() - center).div_(teacher_temp)
    return F.softmax(logits, dim=-1)


def full_precision(tensor: Tensor) -> torch.autocast:
    """Autocast off on ``tensor``'s device. The losses' reductions over the C prototypes stay in
    float32, as DINO's element-wise loss does under AMP: autocast would run the products among
    them (``matmul``, ``vecdot``) in bf16/fp16, which cost about 1 % of the loss value."""
    return torch.autocast(tensor.device.type, enabled=False)


def soft_cross_entropy(student_logits: Tensor, probs: Tensor, student_temp: float) -> Tensor:
    """``-sum_c probs * log_softmax(student / tau_s)`` over the last dim, in float32.

    Computed as ``logsumexp(z) * sum(probs) - <probs, z>`` with ``z = student / tau_s`` and a
    backward of its own, ``softmax(z) * sum(probs) - probs`` (times the incoming gradient over
    tau_s), recomputed from the logits: autograd would keep the [..., C] log-probabilities and
    two more tensors of that size, which for DenseDINO's reference tokens (C = 65536) made a
    good part of the step's memory above DINO's. Teacher probabilities that require a gradient
    take the plain formula.
    """
    if probs.requires_grad:
        log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        return -torch.sum(probs * log_p, dim=-1)
    return _SoftCrossEntropy.apply(student_logits, probs, student_temp)


class _SoftCrossEntropy(torch.autograd.Function):
    """The cross-entropy of :func:`soft_cross_entropy` with nothing of size C saved but its
    inputs (teacher probabilities are constants here)."""

    @staticmethod
    def forward(ctx, logits: Tensor, probs: Tensor, temp: float) -> Tensor:
        z = logits.float() / temp
        lse = torch.logsumexp(z, dim=-1)
        mass = probs.sum(-1)
        ctx.save_for_backward(logits, probs, lse, mass)
        ctx.temp = temp
        with full_precision(z):
            return lse * mass - torch.linalg.vecdot(probs, z)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, probs, lse, mass = ctx.saved_tensors
        soft = (logits.float() / ctx.temp).sub_(lse.unsqueeze(-1)).exp_()
        soft.mul_(mass.unsqueeze(-1)).sub_(probs).mul_((grad / ctx.temp).unsqueeze(-1))
        return soft.to(logits.dtype), None, None


def normalised_entropy(probs: Tensor) -> Tensor:
    """Mean entropy of distributions [..., C] divided by log(C): 1 = uniform, 0 = one-hot.

    For logging: take it from the probabilities the loss already computed, never a second
    softmax of the logits.
    """
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
    return entropy / math.log(probs.shape[-1])


def default_pairs(num_teacher: int, num_student: int) -> list[tuple[int, int]]:
    """DINO's pairs: every teacher view iq against every student view v != iq."""
    return [(iq, v) for iq in range(num_teacher) for v in range(num_student) if v != iq]


class CenteredLoss(nn.Module):
    """What DINO-style losses share: prototypes, a student temperature and their own center."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        check_temperature(student_temp, f"{type(self).__name__}: student_temp")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.centering = Center(out_dim, center_momentum)

    @property
    def center(self) -> Tensor:
        """The current center [1, out_dim]."""
        return self.centering.center


class DINOLoss(CenteredLoss):
    """Cross-entropy between centered/sharpened teacher and student distributions.

    For each pair (iq, v): ``-sum_c softmax((t_iq - center) / tau_t) * log_softmax(s_v / tau_s)``,
    averaged over the batch, then over the pairs.

    Args:
        out_dim: Number of prototypes (head output size).
        student_temp: Student temperature tau_s.
        center_momentum: EMA momentum of the teacher center.
    """

    def forward(
        self,
        student_out: Sequence[Tensor] | Tensor,
        teacher_out: Tensor,
        teacher_temp: float,
        pairs: Sequence[tuple[int, int]] | None = None,
    ) -> Tensor:
        """Compute the loss.

        Args:
            student_out: Student head outputs for V views: a sequence of [B, C] or a [V, B, C].
            teacher_out: Teacher raw head outputs [T, B, C] for the T teacher views; teacher
                view iq is the same crop as student view iq.
            teacher_temp: Teacher temperature tau_t (driven by a scheduler).
            pairs: (teacher view, student view) pairs to use; default `default_pairs(T, V)`.

        Returns:
            Scalar loss.
        """
        check_temperature(teacher_temp, "DINOLoss: teacher_temp")
        student = self._stack_student(student_out)
        self._check_teacher(teacher_out, student)
        num_teacher, num_student = teacher_out.shape[0], student.shape[0]
        pairs = default_pairs(num_teacher, num_student) if pairs is None else list(pairs)
        _check_pairs(pairs, num_teacher, num_student)

        return self.from_probs(
            student, teacher_probs(teacher_out, self.center, teacher_temp), pairs
        )

    def from_probs(
        self, student: Tensor, probs: Tensor, pairs: Sequence[tuple[int, int]]
    ) -> Tensor:
        """The loss from the teacher's probabilities [T, B, C] (``teacher_probs``), so that the
        caller can reuse them (e.g. for the logged entropy).

        The cross-entropy is linear in the log-probabilities, so the student views paired with
        one teacher view are summed first (a [T, V] pair-count matrix times the [V, B*C]
        log-probabilities): one product with each teacher view instead of one per pair.
        """
        num_student = student.shape[0]
        log_p = F.log_softmax(student.float() / self.student_temp, dim=-1)
        counts = torch.zeros(probs.shape[0], num_student)
        for iq, v in pairs:
            counts[iq, v] += 1.0
        counts = counts.to(log_p.device, non_blocking=True)
        with full_precision(log_p):
            summed = (counts @ log_p.flatten(1)).view(probs.shape)  # [T, B, C]
        return -(probs * summed).sum(-1).mean(-1).sum() / len(pairs)

    def update_center(self, teacher_out: Tensor) -> None:
        """Fold the teacher's raw outputs [..., C] into the center EMA (all ranks)."""
        self.centering.update(teacher_out)

    def _stack_student(self, student_out: Sequence[Tensor] | Tensor) -> Tensor:
        if isinstance(student_out, Tensor):
            student = student_out
        else:
            if len(student_out) == 0:
                raise ValueError("DINOLoss: student_out is empty")
            shapes = {tuple(s.shape) for s in student_out}
            if len(shapes) != 1:
                raise ValueError(f"DINOLoss: student views differ in shape: {sorted(shapes)}")
            student = torch.stack(list(student_out))
        if student.ndim != 3 or student.shape[-1] != self.out_dim:
            raise ValueError(
                f"DINOLoss: student_out must be [V, B, {self.out_dim}] (or V tensors "
                f"[B, {self.out_dim}]), got shape {tuple(student.shape)}"
            )
        return student

    def _check_teacher(self, teacher_out: Tensor, student: Tensor) -> None:
        if teacher_out.ndim != 3 or teacher_out.shape[-1] != self.out_dim:
            raise ValueError(
                f"DINOLoss: teacher_out must be [T, B, {self.out_dim}], "
                f"got shape {tuple(teacher_out.shape)}"
            )
        if teacher_out.shape[1] != student.shape[1]:
            raise ValueError(
                f"DINOLoss: batch size differs: teacher {teacher_out.shape[1]}, "
                f"student {student.shape[1]}"
            )


def _check_pairs(pairs: list[tuple[int, int]], num_teacher: int, num_student: int) -> None:
    """Raise ValueError for an empty pair list or an index out of range."""
    if not pairs:
        raise ValueError(
            f"DINOLoss: no (teacher, student) pairs (T={num_teacher}, V={num_student})"
        )
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"DINOLoss: a pair must be (teacher_view, student_view), got {pair}")
        iq, v = pair
        if not (0 <= iq < num_teacher and 0 <= v < num_student):
            raise ValueError(
                f"DINOLoss: pair {pair} out of range (T={num_teacher} teacher views, "
                f"V={num_student} student views)"
            )

"""DenseDINO's reference-token loss and the combination with the CLS loss.

Reference tokens come in pairs of views. For teacher view iq and student view v != iq, the
teacher's tokens of pair (iq, v) and the student's tokens of pair (v, iq) point at the same image
locations; the caller aligns them so that index p of `student_ref` and `teacher_ref` is one such
match. The loss is DINO's cross-entropy applied per token with its own center.
"""

from __future__ import annotations

import torch
from torch import Tensor

from densedino.checks import check_temperature
from densedino.losses.dino import CenteredLoss, soft_cross_entropy, teacher_probs

__all__ = ["ReferenceLoss", "combine"]


class ReferenceLoss(CenteredLoss):
    """Per-token cross-entropy between teacher and student reference-token distributions.

    Args:
        out_dim: Number of prototypes of the reference head.
        student_temp: Student temperature tau_s.
        center_momentum: EMA momentum of the reference center (separate from the CLS center).
    """

    def forward(
        self,
        student_ref: Tensor,
        teacher_ref: Tensor,
        teacher_temp: float,
        valid: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss.

        Args:
            student_ref: Student reference head outputs [P, B, K, C] (pair p = student side).
            teacher_ref: Teacher reference head outputs [P, B, K, C], aligned with `student_ref`.
            teacher_temp: Teacher temperature tau_t.
            valid: Optional bool mask [P, B, K]; False marks tokens to ignore (e.g. padding).

        Returns:
            Scalar loss: per pair, the mean cross-entropy over its (valid) tokens of all B
            samples and K points; then the mean over pairs. With a mask, pairs without any valid
            token are left out of the mean; if no token is valid the loss is 0 (still attached
            to the graph so backward works on every rank).
        """
        check_temperature(teacher_temp, "ReferenceLoss: teacher_temp")
        self._check_shapes(student_ref, teacher_ref, valid)
        return self.from_probs(
            student_ref, teacher_probs(teacher_ref, self.center, teacher_temp), valid
        )

    def from_probs(self, student_ref: Tensor, probs: Tensor, valid: Tensor | None = None) -> Tensor:
        """The loss from the teacher's probabilities [P, B, K, C] (``teacher_probs`` of the raw
        outputs with this loss's center), which the caller may reuse for its diagnostics."""
        self._check_shapes(student_ref, probs, valid)
        ce = soft_cross_entropy(student_ref, probs, self.student_temp)  # [P, B, K]
        if valid is None:
            return ce.mean()
        weights = valid.to(ce.dtype)
        per_pair_count = weights.sum(dim=(1, 2))  # [P]
        # where(), not a product, so NaN/inf in ignored tokens cannot leak into the sum.
        per_pair_sum = torch.where(valid, ce, torch.zeros_like(ce)).sum(dim=(1, 2))
        used = per_pair_count > 0
        if not bool(used.any()):
            return per_pair_sum.sum()  # exactly 0: every token was masked out
        return (per_pair_sum[used] / per_pair_count[used]).mean()

    def update_center(self, teacher_ref: Tensor, valid: Tensor | None = None) -> None:
        """Fold the teacher's raw reference outputs [..., C] into the reference center.

        If `valid` (bool, `teacher_ref.shape[:-1]`) is given, only valid tokens count.
        """
        if valid is not None:
            if valid.dtype != torch.bool or tuple(valid.shape) != tuple(teacher_ref.shape[:-1]):
                raise ValueError(
                    f"ReferenceLoss.update_center: valid must be a bool tensor of shape "
                    f"{tuple(teacher_ref.shape[:-1])}, got {valid.dtype} {tuple(valid.shape)}"
                )
            teacher_ref = teacher_ref[valid]
        self.centering.update(teacher_ref)

    def _check_shapes(self, student_ref: Tensor, teacher_ref: Tensor, valid: Tensor | None) -> None:
        for name, t in (("student_ref", student_ref), ("teacher_ref", teacher_ref)):
            if t.ndim != 4 or t.shape[-1] != self.out_dim:
                raise ValueError(
                    f"ReferenceLoss: {name} must be [P, B, K, {self.out_dim}], "
                    f"got shape {tuple(t.shape)}"
                )
        if student_ref.shape != teacher_ref.shape:
            raise ValueError(
                f"ReferenceLoss: student_ref {tuple(student_ref.shape)} and teacher_ref "
                f"{tuple(teacher_ref.shape)} must have the same shape (aligned pairs)"
            )
        if student_ref.shape[0] == 0:
            raise ValueError("ReferenceLoss: no pairs (P = 0)")
        if valid is not None and (
            valid.dtype != torch.bool or tuple(valid.shape) != tuple(student_ref.shape[:-1])
        ):
            raise ValueError(
                f"ReferenceLoss: valid must be a bool tensor of shape "
                f"{tuple(student_ref.shape[:-1])}, got {valid.dtype} {tuple(valid.shape)}"
            )


def combine(loss_cls: Tensor, loss_ref: Tensor, alpha: float = 0.5) -> Tensor:
    """DenseDINO's total loss ``alpha * loss_cls + (1 - alpha) * loss_ref`` (paper: alpha 0.5)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"combine: alpha must be in [0, 1], got {alpha}")
    return alpha * loss_cls + (1.0 - alpha) * loss_ref

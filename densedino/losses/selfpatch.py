"""SelfPatch's patch-level loss (Yun et al., CVPR 2022; alinlab/SelfPatch ``main_selfpatch.py``).

For every view v, the student's patch p of view v is matched with the teacher's aggregate of
patch p's most similar neighbours in the same view v (positions align because both sides see the
same crop). The loss is DINO's cross-entropy per patch with its own center, averaged over the
batch and the patches of a view, then over the views.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from densedino.checks import check_temperature
from densedino.losses.dino import CenteredLoss, teacher_probs

__all__ = ["PatchLoss"]


class PatchLoss(CenteredLoss):
    """Per-patch cross-entropy between teacher aggregates and student patches, same view.

    ``-sum_c softmax((t_vp - patch_center) / tau_t) * log_softmax(s_vp / tau_s)``, mean over the
    B samples and N_v patches of view v, then mean over the V views (SelfPatch's ``p_loss``).

    Args:
        out_dim: Number of prototypes of the patch head (SelfPatch: 4096).
        student_temp: Student temperature tau_s.
        center_momentum: EMA momentum of the patch center (separate from the image-level one).
    """

    def forward(
        self,
        student_patch: Sequence[Tensor],
        teacher_patch: Sequence[Tensor],
        teacher_temp: float,
    ) -> Tensor:
        """Compute the loss.

        Args:
            student_patch: V tensors [B, N_v, C]: the student's patch outputs of each view.
            teacher_patch: V tensors [B, N_v, C]: the teacher's aggregates, aligned with
                ``student_patch`` (same view, same patch order).
            teacher_temp: Teacher temperature tau_t.

        Returns:
            Scalar loss.
        """
        check_temperature(teacher_temp, "PatchLoss: teacher_temp")
        self._check(student_patch, teacher_patch)
        terms = []
        for s, t in zip(student_patch, teacher_patch, strict=True):
            q = teacher_probs(t, self.center, teacher_temp)
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)
            terms.append(torch.sum(-q * log_p, dim=-1).mean())
        return torch.stack(terms).mean()

    def update_center(self, teacher_patch: Sequence[Tensor]) -> None:
        """Fold every teacher patch output of every view into the patch center: one mean over
        all patches (views with more patches weigh more), as SelfPatch's
        ``update_patch_center``."""
        if len(teacher_patch) == 0:
            raise ValueError("PatchLoss.update_center: no views")
        rows = torch.cat([t.detach().reshape(-1, t.shape[-1]) for t in teacher_patch])
        self.centering.update(rows)

    def _check(self, student_patch: Sequence[Tensor], teacher_patch: Sequence[Tensor]) -> None:
        if len(student_patch) == 0:
            raise ValueError("PatchLoss: no views")
        if len(student_patch) != len(teacher_patch):
            raise ValueError(
                f"PatchLoss: {len(student_patch)} student views but {len(teacher_patch)} "
                "teacher views (the loss compares each view with itself)"
            )
        for v, (s, t) in enumerate(zip(student_patch, teacher_patch, strict=True)):
            if s.ndim != 3 or s.shape[-1] != self.out_dim:
                raise ValueError(
                    f"PatchLoss: student view {v} must be [B, N, {self.out_dim}], "
                    f"got shape {tuple(s.shape)}"
                )
            if s.shape != t.shape:
                raise ValueError(
                    f"PatchLoss: view {v}: student {tuple(s.shape)} and teacher "
                    f"{tuple(t.shape)} must have the same shape (aligned patches)"
                )

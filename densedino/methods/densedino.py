"""DenseDINO (Yuan et al., IJCAI 2023): DINO plus a DINO loss on reference tokens.

Points sampled in the overlap of two crops enter both views as reference tokens; the teacher's
token of pair (iq, v) in view iq is matched with the student's token of the same pair in view v.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from densedino.losses import ReferenceLoss, combine
from densedino.methods.base import StepState
from densedino.methods.dino import DINO, PairMode, collapse_diagnostics, forward_views
from densedino.models.heads import DINOHead


class DenseDINO(DINO):
    """DINO with reference tokens.

    Each teacher view iq carries the points of its pairs with every other view; each student
    view v carries the points of its pairs with the teacher views other than itself (the
    authors' layout). Views come with ``batch['points']`` [B, V, V, K, 2] from
    :class:`densedino.data.views.MultiViewTransform`: ``points[:, a, b]`` are the K points of the
    pair (a, b) in view a's normalised frame.

    Args (beyond :class:`DINO`):
        alpha: weight of the CLS loss in ``alpha * cls + (1 - alpha) * ref`` (paper 0.5; 1 gives
            DINO, 0 the reference loss alone).
        ref_pairs: ``all``: reference loss on every (teacher view, other view) pair (authors);
            ``global``: only between teacher views.
        ref_out_dim: prototypes of the reference head (default: ``out_dim``).
        ref_content: ``zero`` or ``learnable`` content of the reference tokens.
    """

    def __init__(
        self,
        *args,
        alpha: float = 0.5,
        ref_pairs: PairMode = "all",
        ref_out_dim: int | None = None,
        ref_content: str = "zero",
        **kwargs,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if ref_pairs not in ("all", "global"):
            raise ValueError(f"ref_pairs must be 'all' or 'global', got {ref_pairs!r}")
        self.ref_out_dim = ref_out_dim
        backbone = {"ref_content": ref_content, **(kwargs.pop("backbone", None) or {})}
        super().__init__(*args, backbone=backbone, **kwargs)
        self.alpha = alpha
        self.ref_pairs = ref_pairs
        self.ref_loss = ReferenceLoss(
            self.student.ref_head.out_dim,
            self.dino_loss.student_temp,
            self.dino_loss.centering.momentum,
        )

    def build_heads(self, dim: int, out_dim: int, head_kw: dict) -> dict[str, nn.Module]:
        heads = super().build_heads(dim, out_dim, head_kw)
        heads["ref_head"] = DINOHead(dim, self.ref_out_dim or out_dim, **head_kw)
        return heads

    def partners(self, num_views: int) -> tuple[list[list[int]], list[list[int]]]:
        """For every teacher view the views it pairs with, and the same for every student view."""
        num_t = self.num_teacher
        teacher = [[v for v in range(num_views) if v != iq] for iq in range(num_t)]
        student = [[iq for iq in range(num_t) if iq != v] for v in range(num_views)]
        return teacher, student

    def ref_loss_pairs(self, num_views: int) -> list[tuple[int, int]]:
        """(teacher view, student view) pairs of the reference loss."""
        last = self.num_teacher if self.ref_pairs == "global" else num_views
        return [(iq, v) for iq in range(self.num_teacher) for v in range(last) if v != iq]

    def compute_losses(self, batch: dict, state: StepState) -> dict[str, Tensor]:
        views, points = batch["views"], batch["points"]
        self.check_views(views)
        num_views, num_points = len(views), points.shape[3]
        t_partners, s_partners = self.partners(num_views)
        t_points = [points[:, iq, p].flatten(1, 2) for iq, p in enumerate(t_partners)]
        s_points = [points[:, v, p].flatten(1, 2) for v, p in enumerate(s_partners)]

        with torch.no_grad():
            t_feat, t_refs = forward_views(
                self.teacher.backbone, views[: self.num_teacher], t_points
            )
            t_out = self.teacher.head(t_feat)
            t_ref_out = [self.teacher.ref_head(r).unflatten(1, (-1, num_points)) for r in t_refs]
        s_feat, s_refs = forward_views(self.student.backbone, views, s_points)
        s_ref_out = [self.student.ref_head(r).unflatten(1, (-1, num_points)) for r in s_refs]

        # Teacher tokens of pair (iq, v) against student tokens of pair (v, iq): [P, B, K, C].
        pairs = self.ref_loss_pairs(num_views)
        teacher_tok = torch.stack([t_ref_out[iq][:, t_partners[iq].index(v)] for iq, v in pairs])
        student_tok = torch.stack([s_ref_out[v][:, s_partners[v].index(iq)] for iq, v in pairs])
        temp = state.teacher_temp
        loss_ref = self.ref_loss(student_tok, teacher_tok, temp)
        if self.alpha > 0:
            s_out = self.student.head(s_feat)
            loss_cls = self.dino_loss(s_out, t_out, temp, self.pairs(num_views))
        else:  # reference loss alone: skip the student's CLS head
            loss_cls = torch.zeros((), device=loss_ref.device)
        loss = combine(loss_cls, loss_ref, self.alpha)

        diagnostics = collapse_diagnostics(t_feat, t_out, self.dino_loss.center, temp)
        ref_diag = collapse_diagnostics(t_refs[0], teacher_tok, self.ref_loss.center, temp)
        self.dino_loss.update_center(t_out)
        # The reference center follows the teacher tokens that the loss uses.
        self.ref_loss.update_center(teacher_tok)
        return {
            "loss": loss,
            "loss_cls": loss_cls.detach(),
            "loss_ref": loss_ref.detach(),
            **diagnostics,
            "ref_teacher_entropy": ref_diag["teacher_entropy"],
        }

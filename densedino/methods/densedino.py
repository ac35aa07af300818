"""DenseDINO (Yuan et al., IJCAI 2023): DINO plus a DINO loss on reference tokens.

Points sampled in the overlap of two crops enter both views as reference tokens; the teacher's
token of pair (iq, v) in view iq is matched with the student's token of the same pair in view v.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedino.losses import ReferenceLoss, combine
from densedino.losses.dino import teacher_probs
from densedino.methods.base import (
    StepState,
    collapse_diagnostics,
    forward_views,
    resolution_groups,
)
from densedino.methods.dino import DINO, PairMode
from densedino.models.heads import DINOHead
from densedino.models.vit import VisionTransformer

Pairs = list[tuple[int, int]]


class DenseDINO(DINO):
    """DINO with reference tokens.

    Each teacher view iq carries the points of its pairs with the views it is matched with;
    each student view v carries the points of its pairs with the teacher views it is matched
    with (the authors' layout). Views come with ``batch['points']`` [B, V, V, K, 2] from
    :class:`densedino.data.views.MultiViewTransform`: ``points[:, a, b]`` are the K points of the
    pair (a, b) in view a's normalised frame.

    Each head runs once per network per step: the reference features are gathered in pair
    order in feature space, so the [P, B, K, out_dim] logits are made once by the head.

    Args (beyond :class:`DINO`):
        alpha: weight of the CLS loss in ``alpha * cls + (1 - alpha) * ref`` (paper 0.5). At 1
            the reference head, at 0 the student's CLS head is frozen and skipped, so that
            every trained parameter gets a gradient (DDP requires it).
        ref_pairs: ``all``: reference loss on every (teacher view, other view) pair (authors);
            ``global``: only between teacher views.
        ref_out_dim: prototypes of the reference head (default: ``out_dim``).
        ref_content: ``zero`` or ``learnable`` content of the reference tokens.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        ref_pairs: PairMode = "all",
        ref_out_dim: int | None = None,
        ref_content: str = "zero",
        **dino_kwargs: Any,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if ref_pairs not in ("all", "global"):
            raise ValueError(f"ref_pairs must be 'all' or 'global', got {ref_pairs!r}")
        self.ref_out_dim = ref_out_dim
        backbone = {"ref_content": ref_content, **(dino_kwargs.pop("backbone", None) or {})}
        super().__init__(backbone=backbone, **dino_kwargs)
        self.alpha = alpha
        self.ref_pairs = ref_pairs
        self.ref_loss = ReferenceLoss(
            self.student.ref_head.out_dim,
            self.dino_loss.student_temp,
            self.dino_loss.centering.momentum,
        )
        unused = {0.0: self.student.head, 1.0: self.student.ref_head}.get(alpha)
        if unused is not None:
            unused.requires_grad_(False)

    def build_heads(
        self, backbone: VisionTransformer, out_dim: int, head_kw: dict
    ) -> dict[str, nn.Module]:
        heads = super().build_heads(backbone, out_dim, head_kw)
        heads["ref_head"] = DINOHead(backbone.embed_dim, self.ref_out_dim or out_dim, **head_kw)
        return heads

    def ref_loss_pairs(self, num_views: int) -> Pairs:
        """(teacher view, student view) pairs of the reference loss."""
        last = self.num_teacher if self.ref_pairs == "global" else num_views
        return [(iq, v) for iq in range(self.num_teacher) for v in range(last) if v != iq]

    def partners(self, num_views: int) -> tuple[list[list[int]], list[list[int]]]:
        """For every teacher view the views it pairs with, and the same for every student view,
        over the pairs of the reference loss."""
        pairs = self.ref_loss_pairs(num_views)
        teacher = [[v for t, v in pairs if t == iq] for iq in range(self.num_teacher)]
        student = [[iq for iq, s in pairs if s == v] for v in range(num_views)]
        return teacher, student

    def compute_losses(self, batch: dict, state: StepState) -> dict[str, Tensor]:
        views, points = batch["views"], batch["points"]
        self.check_views(views)
        num_views, temp = len(views), state.teacher_temp
        pairs = self.ref_loss_pairs(num_views) if self.alpha < 1 else []
        t_partners, s_partners = self.partners(num_views) if pairs else ([], [])
        t_points = [points[:, iq, p].flatten(1, 2) for iq, p in enumerate(t_partners)]
        s_points = [points[:, v, p].flatten(1, 2) for v, p in enumerate(s_partners)]

        with torch.no_grad():
            teacher_views = views[: self.num_teacher]
            t_feat, t_refs = forward_views_with_points(
                self.teacher.backbone, teacher_views, t_points
            )
            t_out = self.teacher.head(t_feat)
        s_feat, s_refs = forward_views_with_points(self.student.backbone, views, s_points)

        out: dict[str, Tensor] = {}
        probs = teacher_probs(t_out, self.dino_loss.center, temp)
        if self.alpha > 0:
            used = self.student_views(num_views)
            s_out = self.student.head(s_feat[:used])
            loss_cls = self.dino_loss.from_probs(s_out, probs, self.pairs(num_views))
        else:
            loss_cls = torch.zeros((), device=t_out.device)
        out.update(collapse_diagnostics(t_feat, probs))
        self.dino_loss.update_center(t_out)

        if pairs:
            with torch.no_grad():
                t_tok = self.teacher.ref_head(pair_tokens(t_refs, t_partners, pairs, 0))
            s_tok = self.student.ref_head(pair_tokens(s_refs, s_partners, pairs, 1))
            ref_probs = teacher_probs(t_tok, self.ref_loss.center, temp)
            loss_ref = self.ref_loss.from_probs(s_tok, ref_probs)
            # The first pair's tokens are enough to watch the reference distribution.
            ref_diag = collapse_diagnostics(t_refs[0], ref_probs[0])
            out["ref_teacher_entropy"] = ref_diag["teacher_entropy"]
            # The reference center follows the teacher tokens that the loss uses.
            self.ref_loss.update_center(t_tok)
        else:
            loss_ref = torch.zeros((), device=t_out.device)
        loss = combine(loss_cls, loss_ref, self.alpha)
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_ref": loss_ref.detach(), **out}


def pair_tokens(refs: list[Tensor], partners: list[list[int]], pairs: Pairs, side: int) -> Tensor:
    """Reference features [P, B, K, D] in pair order from per-view outputs [B, M_v, D].

    View ``pair[side]`` holds pair p's K tokens at the position of ``pair[1 - side]`` among its
    partners (``points[:, a, partners[a]]`` flattened to [B, M_a, 2]).
    """
    chunks = []
    for pair in pairs:
        view, other = pair[side], pair[1 - side]
        tokens = refs[view].unflatten(1, (len(partners[view]), -1))  # [B, partners, K, D]
        chunks.append(tokens[:, partners[view].index(other)])
    return torch.stack(chunks)


def forward_views_with_points(
    backbone: VisionTransformer, views: Sequence[Tensor], ref_points: Sequence[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    """CLS features [V, B, D] and reference outputs (V tensors [B, M_v, D]) of every view with
    its points ``ref_points`` (V tensors [B, M_v, 2]; none at all: an empty sequence).

    Views of equal size run in one pass, their points zero-padded to the longest, which is
    harmless because reference tokens never see each other.
    """
    if not ref_points:
        return forward_views(backbone, views), []
    cls_parts: list[Tensor] = []
    refs: list[Tensor] = []
    for start, end in resolution_groups(views):
        group = ref_points[start:end]
        longest = max(p.shape[1] for p in group)
        points = torch.cat([F.pad(p, (0, 0, 0, longest - p.shape[1])) for p in group])
        out = backbone.forward_features(torch.cat(list(views[start:end])), points)
        cls_parts.append(out["cls"])
        chunks = out["ref"].chunk(end - start)
        refs.extend(c[:, : p.shape[1]] for c, p in zip(chunks, group, strict=True))
    return torch.cat(cls_parts).unflatten(0, (len(views), -1)), refs

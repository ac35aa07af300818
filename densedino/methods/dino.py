"""DINO: self-distillation of the CLS token between a student and an EMA teacher."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from densedino.losses import DINOLoss, default_pairs
from densedino.losses.dino import teacher_probs
from densedino.methods.base import (
    Network,
    SSLMethod,
    StepState,
    collapse_diagnostics,
    forward_views,
    make_teacher,
)
from densedino.models.heads import DINOHead, cancel_last_layer_gradients
from densedino.models.vit import VisionTransformer, build_backbone

PairMode = Literal["all", "global"]


class DINO(SSLMethod):
    """DINO (Caron et al., 2021): the teacher sees the first ``num_teacher`` views, the student
    all of them; cross-entropy between CLS distributions of different views.

    Args:
        arch, patch_size: backbone (``build_backbone``).
        out_dim: number of prototypes of the head.
        head: extra ``DINOHead`` arguments (hidden_dim, bottleneck_dim, nlayers, use_bn).
        norm_last_layer: freeze the weight-norm magnitude of the head's last layer.
        drop_path_rate: stochastic depth of the student (the teacher has none).
        num_teacher: teacher views (the first views of every batch).
        cls_pairs: ``all``: every (teacher view, other view) pair (DINO); ``global``: only
            between teacher views (the DenseDINO authors' recipe).
        student_temp, center_momentum: loss constants (0.1, 0.9).
        backbone: extra ``build_backbone`` arguments.
    """

    def __init__(
        self,
        arch: str = "vit_small",
        patch_size: int = 16,
        out_dim: int = 65536,
        head: dict | None = None,
        norm_last_layer: bool = True,
        drop_path_rate: float = 0.1,
        num_teacher: int = 2,
        cls_pairs: PairMode = "all",
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        backbone: dict | None = None,
    ) -> None:
        super().__init__()
        if cls_pairs not in ("all", "global"):
            raise ValueError(f"cls_pairs must be 'all' or 'global', got {cls_pairs!r}")
        self.num_teacher = num_teacher
        self.cls_pairs = cls_pairs
        vit = build_backbone(arch, patch_size, drop_path_rate=drop_path_rate, **(backbone or {}))
        head_kw = {"norm_last_layer": norm_last_layer, **(head or {})}
        heads = self.build_heads(vit, out_dim, head_kw)
        self.student = Network(vit, heads)
        self.teacher = make_teacher(self.student)
        self.dino_loss = DINOLoss(out_dim, student_temp, center_momentum)

    def build_heads(
        self, backbone: VisionTransformer, out_dim: int, head_kw: dict
    ) -> dict[str, nn.Module]:
        """The heads on the backbone; subclasses extend DINO by adding theirs here and their
        own arguments in front of ``**dino_kwargs`` (see DenseDINO, SelfPatch)."""
        return {"head": DINOHead(backbone.embed_dim, out_dim, **head_kw)}

    def cancel_last_layer_gradients(self) -> None:
        cancel_last_layer_gradients(self.student)

    def pairs(self, num_views: int) -> list[tuple[int, int]]:
        """(teacher view, student view) pairs of the CLS loss."""
        num_student = self.num_teacher if self.cls_pairs == "global" else num_views
        return default_pairs(self.num_teacher, num_student)

    def student_views(self, num_views: int) -> int:
        """How many views (the first ones) the student's CLS head sees: those the loss uses."""
        return self.num_teacher if self.cls_pairs == "global" else num_views

    def compute_losses(self, batch: dict, state: StepState) -> dict[str, Tensor]:
        views = batch["views"]
        self.check_views(views)
        with torch.no_grad():
            t_feat = forward_views(self.teacher.backbone, views[: self.num_teacher])
            t_out = self.teacher.head(t_feat)
        used = self.student_views(len(views))
        s_feat = forward_views(self.student.backbone, views[:used])
        probs = teacher_probs(t_out, self.dino_loss.center, state.teacher_temp)
        loss = self.dino_loss.from_probs(self.student.head(s_feat), probs, self.pairs(len(views)))
        self.dino_loss.update_center(t_out)
        return {"loss": loss, "loss_cls": loss.detach(), **collapse_diagnostics(t_feat, probs)}

    def check_views(self, views: Sequence[Tensor]) -> None:
        if len(views) < max(2, self.num_teacher):
            raise ValueError(
                f"{type(self).__name__} needs at least max(2, num_teacher={self.num_teacher}) "
                f"views, got {len(views)}"
            )

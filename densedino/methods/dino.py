"""DINO: self-distillation of the CLS token between a student and an EMA teacher."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedino.losses import DINOLoss, default_pairs
from densedino.losses.dino import normalised_entropy, teacher_probs
from densedino.methods.base import SSLMethod, StepState, make_teacher, resolution_groups
from densedino.models.heads import DINOHead, cancel_last_layer_gradients
from densedino.models.vit import VisionTransformer, build_backbone

PairMode = Literal["all", "global"]


class Network(nn.Module):
    """Backbone plus the heads a method puts on it (student and teacher share this shape)."""

    def __init__(self, backbone: VisionTransformer, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        for name, head in heads.items():
            self.add_module(name, head)


def forward_views(
    backbone: VisionTransformer,
    views: Sequence[Tensor],
    ref_points: Sequence[Tensor] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Run the backbone on every view, batching views of equal size (DINO's multi-crop wrapper).

    Args:
        views: V tensors [B, 3, S_v, S_v].
        ref_points: optional V tensors [B, M_v, 2]; within a size group they are zero-padded to
            the longest, which is harmless because reference tokens never see each other.

    Returns:
        CLS features [V, B, D] and, with points, the V reference outputs [B, M_v, D].
    """
    cls_parts: list[Tensor] = []
    refs: list[Tensor] = []
    for start, end in resolution_groups(views):
        images = torch.cat(list(views[start:end]))
        points = None
        if ref_points is not None:
            group = ref_points[start:end]
            longest = max(p.shape[1] for p in group)
            points = torch.cat([F.pad(p, (0, 0, 0, longest - p.shape[1])) for p in group])
        out = backbone.forward_features(images, points)
        cls_parts.append(out["cls"])
        if ref_points is not None:
            chunks = out["ref"].chunk(end - start)
            refs.extend(c[:, : p.shape[1]] for c, p in zip(chunks, group, strict=True))
    cls = torch.cat(cls_parts).unflatten(0, (len(views), -1))
    return cls, refs


def collapse_diagnostics(features: Tensor, probs: Tensor) -> dict[str, Tensor]:
    """Signals of the two DINO collapse modes, logged every step at the cost of two reductions.

    ``feature_std``: per-dimension std of the L2-normalised teacher features across the batch,
    times sqrt(D) (about 1 for features spread on the sphere, 0 when all images map to one point).
    ``teacher_entropy``: mean entropy of the teacher distribution ``probs`` (the centered,
    sharpened softmax the loss uses) divided by log(C) (1 = uniform collapse, 0 = one prototype
    takes everything).
    """
    flat = F.normalize(features.detach().flatten(0, -2).float(), dim=-1)
    std = flat.std(dim=0).mean() * math.sqrt(flat.shape[-1])
    return {"feature_std": std, "teacher_entropy": normalised_entropy(probs)}


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
        heads = self.build_heads(vit.embed_dim, out_dim, head_kw)
        self.student = Network(vit, heads)
        self.teacher = make_teacher(self.student)
        self.dino_loss = DINOLoss(out_dim, student_temp, center_momentum)

    def build_heads(self, dim: int, out_dim: int, head_kw: dict) -> dict[str, nn.Module]:
        """The heads on the backbone; subclasses add theirs."""
        return {"head": DINOHead(dim, out_dim, **head_kw)}

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
            t_feat, _ = forward_views(self.teacher.backbone, views[: self.num_teacher])
            t_out = self.teacher.head(t_feat)
        used = self.student_views(len(views))
        s_feat, _ = forward_views(self.student.backbone, views[:used])
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

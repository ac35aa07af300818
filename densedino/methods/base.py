"""What every self-supervised method plugs into the shared trainer.

A method owns its networks (student, and a teacher if it has one) and its losses, and says how a
batch of views turns into losses. The trainer (``densedino.train``) only calls the four methods of
:class:`SSLMethod`; it knows nothing about any particular method.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedino.losses.dino import normalised_entropy
from densedino.models.vit import VisionTransformer


@dataclass
class StepState:
    """Schedule values for one training iteration, set by the trainer before the step."""

    epoch: int = 0
    iteration: int = 0
    teacher_temp: float = 0.04
    momentum: float = 0.996


class SSLMethod(nn.Module):
    """Base class of a method: ``student`` is trained, ``teacher`` follows it by EMA.

    A method without a teacher sets ``self.teacher = None`` (no class-level default: it would
    shadow the submodule that ``nn.Module`` registers).
    """

    student: nn.Module
    teacher: nn.Module | None

    def compute_losses(self, batch: dict, state: StepState) -> dict[str, Tensor]:
        """Return ``{'loss': differentiable total, **detached parts and diagnostics}``."""
        raise NotImplementedError

    def cancel_last_layer_gradients(self) -> None:
        """Drop the gradients of what stays frozen in the first epochs (DINO: the heads' last
        layers); called between backward and the optimizer step. Default: nothing."""

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of the student's parameters into the teacher's (no-op without a teacher)."""
        if self.teacher is None:
            return
        teacher, student = ema_pairs(self.teacher, self.student)
        # DINO's ``param_k.mul_(m).add_((1 - m) * param_q)`` as two multi-tensor kernels.
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def export_backbone(self) -> nn.Module:
        """The backbone to evaluate and serve (the teacher's when there is one, as DINO does)."""
        owner = self.teacher if self.teacher is not None else self.student
        return owner.backbone


def ema_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The teacher's parameters and the student's of the same names, in the same order."""
    named = dict(student.named_parameters())
    pairs = [(param_t, named[name].detach()) for name, param_t in teacher.named_parameters()]
    return [t for t, _ in pairs], [s for _, s in pairs]


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student with the same weights (and no stochastic depth)."""
    teacher = copy.deepcopy(student)
    for module in teacher.modules():
        if hasattr(module, "drop_prob"):  # timm DropPath
            module.drop_prob = 0.0
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def resolution_groups(views: Sequence[Tensor]) -> list[tuple[int, int]]:
    """Runs ``[start, end)`` of consecutive views with the same size, batched in one forward
    pass as DINO's MultiCropWrapper does."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class Network(nn.Module):
    """Backbone plus the heads a method puts on it (student and teacher share this shape)."""

    def __init__(self, backbone: VisionTransformer, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        for name, head in heads.items():
            self.add_module(name, head)


def forward_views(backbone: VisionTransformer, views: Sequence[Tensor]) -> Tensor:
    """CLS features [V, B, D] of V views [B, 3, H_v, W_v], views of equal size batched in one
    pass (DINO's multi-crop wrapper)."""
    parts = [
        backbone.forward_features(torch.cat(list(views[start:end])))["cls"]
        for start, end in resolution_groups(views)
    ]
    return torch.cat(parts).unflatten(0, (len(views), -1))


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

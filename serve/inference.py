"""Batched model calls behind the API: dense features, CLS attention and reference-token maps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from densedino.models.vit import VisionTransformer


class BatchKey(NamedTuple):
    """Requests with equal keys share one forward pass (same task, input size, point or not)."""

    task: Literal["features", "attention"]
    height: int
    width: int
    with_point: bool = False


@dataclass(frozen=True)
class Job:
    """One image of a request: model input [3, h, w] and, for attention, a point in [-1, 1]."""

    pixels: Tensor
    ref_point: tuple[float, float] | None = None


class Engine:
    """Runs batches of jobs on the model; called from one worker thread at a time."""

    def __init__(self, model: VisionTransformer, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)

    def run(self, key: BatchKey, jobs: Sequence[Job]) -> list[dict[str, Tensor]]:
        """Outputs of every job of a batch, in order, as CPU tensors."""
        images = torch.stack([job.pixels for job in jobs]).to(self.device)
        with torch.inference_mode():
            if key.task == "features":
                outputs = self._features(images)
            elif key.with_point:
                points = [job.ref_point for job in jobs]
                if any(point is None for point in points):
                    raise ValueError("a with_point attention batch holds a job without a point")
                outputs = self._attention(images, torch.tensor(points).view(len(jobs), 1, 2))
            else:
                outputs = self._attention(images, None)
        cpu = {name: value.float().cpu() for name, value in outputs.items()}
        return [{name: value[i] for name, value in cpu.items()} for i in range(len(jobs))]

    def _features(self, images: Tensor) -> dict[str, Tensor]:
        out = self.model.forward_features(images)
        return {"cls": out["cls"], "patch": out["patch"]}

    def _attention(self, images: Tensor, ref_points: Tensor | None) -> dict[str, Tensor]:
        """CLS attention [B, heads, h, w]; with points also the reference token's attention
        [B, heads, h, w] and its cosine similarity to every patch feature [B, h, w]."""
        batch = images.shape[0]
        gh, gw = (
            images.shape[-2] // self.model.patch_size,
            images.shape[-1] // self.model.patch_size,
        )
        refs = None if ref_points is None else ref_points.to(self.device)
        attn = self.model.get_last_selfattention(images, refs)  # sequence [CLS | REF | PATCH]
        num_refs = 0 if refs is None else 1
        first_patch = 1 + num_refs
        out = {"cls_attention": attn[:, :, 0, first_patch:].reshape(batch, -1, gh, gw)}
        if refs is not None:
            out["ref_attention"] = attn[:, :, 1, first_patch:].reshape(batch, -1, gh, gw)
            feats = self.model.forward_features(images, refs)
            ref = F.normalize(feats["ref"][:, 0], dim=-1)  # [B, D]
            patch = F.normalize(feats["patch"], dim=-1)  # [B, h, w, D]
            out["ref_similarity"] = torch.einsum("bd,bhwd->bhw", ref, patch)
        return out

    def warmup(self) -> None:
        """One small forward pass of each kind, so that the first request is not the slow one."""
        side = self.model.patch_size * 2
        pixels = torch.zeros(3, side, side)
        self.run(BatchKey("features", side, side), [Job(pixels)])
        self.run(BatchKey("attention", side, side, True), [Job(pixels, (0.0, 0.0))])

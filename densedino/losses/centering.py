"""Running center of teacher outputs (DINO's collapse-avoiding centering), kept apart from losses.

The center is an EMA of the mean teacher output. In distributed training the batch mean is taken
over all ranks by all-reducing the *sum* and the *row count*, so the result is exact even when
ranks hold different numbers of rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Center"]


class Center(nn.Module):
    """EMA of the mean teacher output, stored in the buffer ``center`` [1, dim].

    Args:
        dim: Size of the last dimension of the teacher outputs.
        momentum: EMA momentum: ``center = momentum * center + (1 - momentum) * batch_mean``.
    """

    center: Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"Center: dim must be >= 1, got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Center: momentum must be in [0, 1], got {momentum}")
        self.dim = dim
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, teacher_output: Tensor) -> None:
        """Fold the mean of `teacher_output` [..., dim] (over all leading dims and all ranks)
        into the EMA. A batch with no rows on any rank leaves the center unchanged."""
        if teacher_output.ndim < 1 or teacher_output.shape[-1] != self.dim:
            raise ValueError(
                f"Center.update expects [..., {self.dim}], got shape {tuple(teacher_output.shape)}"
            )
        rows = teacher_output.detach().reshape(-1, self.dim).to(self.center.dtype)
        # Sum and count travel in one tensor: a single collective per update.
        stats = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        total, count = stats[:-1], stats[-1]
        # Decided on the device (no host sync): an empty batch keeps the old center.
        batch_mean = (total / count.clamp_min(1.0)).unsqueeze(0)
        updated = self.center * self.momentum + batch_mean * (1.0 - self.momentum)
        self.center.copy_(torch.where(count > 0, updated, self.center))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, momentum={self.momentum}"

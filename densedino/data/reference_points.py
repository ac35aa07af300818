"""DenseDINO reference points: for each pair of views that involves a teacher view, points inside
the two crops' overlap box, in each view's own normalised frame, so that both sides of a pair
point at the same image location.

A point is first a position ``u`` in the unit square of the pair's overlap box
(:func:`random_positions` or :func:`grid_positions`); :func:`reference_points` maps it into
every view's frame.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pair_mask(num_views: int, num_teacher: int) -> Tensor:
    """Bool ``[V, V]``: True where the pair (a, b) has reference points (a != b, one teacher)."""
    idx = torch.arange(num_views)
    teacher = idx < num_teacher
    return (teacher[:, None] | teacher[None, :]) & (idx[:, None] != idx[None, :])


def random_positions(
    num_views: int, num_points: int, generator: torch.Generator | None = None
) -> Tensor:
    """``num_points`` uniform positions per pair ``[V, V, K, 2]``, the same for (a, b) and
    (b, a)."""
    u = torch.rand(num_views, num_views, num_points, 2, generator=generator)
    upper = torch.ones(num_views, num_views, dtype=torch.bool).triu()[..., None, None]
    return torch.where(upper, u, u.transpose(0, 1))


def grid_positions(grid_side: int) -> Tensor:
    """The ``grid_side`` x ``grid_side`` cell centres ``[1, 1, grid_side ** 2, 2]`` (row-major,
    x fastest), the same for every pair."""
    centres = (torch.arange(grid_side, dtype=torch.float32) + 0.5) / grid_side
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(1, 1, -1, 2)


def reference_points(boxes: Tensor, flips: Tensor, num_teacher: int, positions: Tensor) -> Tensor:
    """DenseDINO reference points ``[V, V, K', 2]`` (float32, NaN where undefined).

    ``positions`` ``[V, V, K', 2]`` (or broadcastable to it) are the points of each pair in the
    unit square of its overlap box. ``points[a, b]`` are the points of the pair {a, b} in view
    a's frame normalised to [-1, 1] ((x, y) order, x negated when view a was flipped);
    ``points[b, a]`` are the same image locations in view b's frame when ``positions`` is
    symmetric in (a, b). The frame is the crop box itself, so it is independent of the view's
    pixel size.
    """
    num_views = boxes.shape[0]
    lo = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])  # [V, V, 2] overlap top-left
    hi = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    location = lo[:, :, None] + positions * (hi - lo)[:, :, None]  # [V, V, K', 2] image pixels
    origin = boxes[:, None, None, :2]
    extent = (boxes[:, 2:] - boxes[:, :2])[:, None, None]
    points = (location - origin) / extent * 2 - 1
    sign = torch.ones(num_views, 1, 1, 2)
    sign[flips, ..., 0] = -1.0
    points = points * sign
    mask = pair_mask(num_views, num_teacher)
    return torch.where(mask[..., None, None], points, torch.full_like(points, float("nan")))

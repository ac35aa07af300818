"""Crop geometry of the training views: RandomResizedCrop boxes and the overlap bound.

Boxes are ``(x0, y0, x1, y1)`` in integer pixels of the original image, drawn on small tensors
through the optional ``torch.Generator`` (or torch's global RNG).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from densedino.data.view_config import ViewConfig

# torchvision's RandomResizedCrop.get_params tries this many (area, ratio) draws per crop
# before falling back to a centre crop.
_RRC_ATTEMPTS = 10
# Candidate crops drawn at once while looking for one that meets the overlap bound; most crops
# pass at the first try, so a small chunk keeps the random draws cheap.
_CANDIDATE_CHUNK = 8


def _centre_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """Width and height of torchvision RandomResizedCrop's fallback centre crop."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return width, round(width / ratio[0])
    if in_ratio > ratio[1]:
        return round(height * ratio[1]), height
    return width, height


def sample_crop_boxes(
    num: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``num`` RandomResizedCrop boxes ``[num, 4]`` (x0, y0, x1, y1) in integer pixels.

    Same distribution as torchvision's ``RandomResizedCrop.get_params``: up to 10 (area, log
    ratio) draws, the first that fits wins, else a centre crop; vectorised over ``num``.
    """
    draws = torch.rand(num, _RRC_ATTEMPTS, 2, generator=generator, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt
    any_fit = fits.any(dim=1)
    centre_w, centre_h = _centre_crop_size(height, width, ratio)
    w = torch.where(any_fit, w.gather(1, first).squeeze(1), float(centre_w))
    h = torch.where(any_fit, h.gather(1, first).squeeze(1), float(centre_h))
    pos = torch.rand(num, 2, generator=generator, dtype=torch.float64)
    x0 = torch.where(any_fit, torch.floor(pos[:, 0] * (width - w + 1)), (width - w) // 2)
    y0 = torch.where(any_fit, torch.floor(pos[:, 1] * (height - h + 1)), (height - h) // 2)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1).float()


def intersection_area(a: Tensor, b: Tensor) -> Tensor:
    """Area of the intersection of boxes ``a`` and ``b`` (broadcast over leading dims)."""
    wh = torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])
    return wh.clamp(min=0).prod(dim=-1)


def _enclosing_box(boxes: Tensor) -> Tensor:
    """Smallest box ``[4]`` containing every box of ``boxes [N, 4]``."""
    return torch.cat([boxes[:, :2].amin(dim=0), boxes[:, 2:].amax(dim=0)])


def _sample_constrained(
    num: int,
    anchors: Tensor,
    min_area: float,
    height: int,
    width: int,
    scale: tuple[float, float],
    cfg: ViewConfig,
    generator: torch.Generator | None,
) -> tuple[Tensor, int]:
    """Draw ``num`` crops whose intersection with every ``anchors`` box exceeds ``min_area``.

    Each crop gets at most ``cfg.max_tries`` candidates; crops still unmatched fall back to the
    box enclosing all anchors. Returns the boxes ``[num, 4]`` and the number of fallbacks.
    """
    out = torch.empty(num, 4)
    pending = torch.arange(num)
    tried = 0
    while pending.numel() > 0 and tried < cfg.max_tries:
        chunk = min(_CANDIDATE_CHUNK, cfg.max_tries - tried)
        cand = sample_crop_boxes(
            pending.numel() * chunk, height, width, scale, cfg.ratio, generator
        ).view(pending.numel(), chunk, 4)
        ok = (intersection_area(cand[:, :, None], anchors) > min_area).all(dim=-1)  # [P, chunk]
        found = ok.any(dim=1)
        first = ok.to(torch.uint8).argmax(dim=1)
        out[pending[found]] = cand[torch.arange(pending.numel()), first][found]
        pending = pending[~found]
        tried += chunk
    if pending.numel() > 0:
        out[pending] = _enclosing_box(anchors)
    return out, int(pending.numel())


def sample_view_boxes(
    cfg: ViewConfig, height: int, width: int, generator: torch.Generator | None = None
) -> tuple[Tensor, int]:
    """Crop boxes ``[V, 4]`` of all views (globals, then locals) and the number of fallbacks.

    Global crops are drawn in order, each against the earlier global crops with the global
    bound; local crops are then drawn (together) against all global crops with the local bound.
    """
    image_area = float(height * width)
    boxes = torch.empty(cfg.num_views, 4)
    boxes[:1] = sample_crop_boxes(1, height, width, cfg.global_scale, cfg.ratio, generator)
    fallbacks = 0
    for g in range(1, cfg.num_global):
        boxes[g : g + 1], n = _sample_constrained(
            1,
            boxes[:g],
            cfg.min_intersection_global * image_area,
            height,
            width,
            cfg.global_scale,
            cfg,
            generator,
        )
        fallbacks += n
    if cfg.num_local > 0:
        boxes[cfg.num_global :], n = _sample_constrained(
            cfg.num_local,
            boxes[: cfg.num_global],
            cfg.min_intersection * image_area,
            height,
            width,
            cfg.local_scale,
            cfg,
            generator,
        )
        fallbacks += n
    return boxes, fallbacks

"""Batches of training views: collate :class:`densedino.data.views.MultiViewTransform` samples,
and turn a batch of uint8 views into normalised float views on the device it sits on."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _stack_values(key: str, values: list[Any]) -> Any:
    """Stack tensors / numbers of one key into a tensor; other values stay a list."""
    if all(isinstance(v, Tensor) for v in values):
        try:
            return torch.stack(values)
        except RuntimeError as err:
            raise ValueError(f"cannot stack key {key!r}: {err}") from err
    if all(isinstance(v, bool | int | float) for v in values):
        return torch.tensor(values)
    return values


def collate_views(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples of :class:`MultiViewTransform` (plus extra keys such as ``label``).

    ``views`` becomes a list with one [B, 3, S_v, S_v] tensor per view index; every other key is
    stacked along a new batch dimension (tensors and numbers), or kept as a list otherwise.
    """
    if not samples:
        raise ValueError("collate_views needs at least one sample")
    keys = samples[0].keys()
    for i, sample in enumerate(samples):
        if sample.keys() != keys:
            raise ValueError(f"sample {i} has keys {sorted(sample)}, expected {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        if key == "views":
            num_views = len(samples[0]["views"])
            if any(len(s["views"]) != num_views for s in samples):
                raise ValueError("samples have different numbers of views")
            batch["views"] = [
                _stack_values(f"views[{v}]", [s["views"][v] for s in samples])
                for v in range(num_views)
            ]
        else:
            batch[key] = _stack_values(key, [s[key] for s in samples])
    return batch


def normalize_views(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with float32 normalised views in place of uint8 ones, computed where the views
    are (the train step calls it after moving the batch to the device).

    uint8 views need ``batch['pixel_norm']`` ([2, 3] or one per sample, [B, 2, 3]: mean; std),
    which is consumed. Float views pass through unchanged.
    """
    views = batch.get("views")
    if not views or views[0].dtype != torch.uint8:
        return batch
    if "pixel_norm" not in batch:
        raise ValueError(
            "uint8 views need batch['pixel_norm'] (mean and std, from "
            "MultiViewTransform(cfg, dtype='uint8'))"
        )
    if any(v.dtype != torch.uint8 for v in views):
        raise ValueError(f"views mix dtypes: {sorted({str(v.dtype) for v in views})}")
    batch = dict(batch)
    stats = batch.pop("pixel_norm")
    stats = (stats[0] if stats.ndim == 3 else stats).float()  # every sample has the same
    if stats.shape != (2, 3):
        raise ValueError(f"pixel_norm must be [2, 3] (mean; std), got {tuple(stats.shape)}")
    # (x / 255 - mean) / std as one multiply-add per pixel.
    scale = (1.0 / (255.0 * stats[1])).view(3, 1, 1)
    shift = (-stats[0] / stats[1]).view(3, 1, 1)
    batch["views"] = [torch.addcmul(shift, v.float(), scale) for v in views]
    return batch

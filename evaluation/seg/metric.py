"""mmseg's IoUMetric, keeping the exact totals (its summary is rounded to 0.01)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS


@dataclass(frozen=True)
class PixelTotals:
    """Pixel counts per class over the whole evaluated set (one confusion matrix's sums)."""

    intersect: np.ndarray  # predicted c where the label is c
    union: np.ndarray  # predicted c or labelled c
    predicted: np.ndarray
    labelled: np.ndarray

    def iou(self) -> np.ndarray:
        """IoU per class; NaN where the class is neither labelled nor predicted."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.intersect / self.union

    def miou(self) -> float:
        """Mean IoU over the classes that occur (labelled or predicted), as mmseg computes it."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        return float(self.intersect.sum() / max(self.labelled.sum(), 1))


@METRICS.register_module()
class ProbeIoUMetric(IoUMetric):
    """``IoUMetric`` (per-image areas, the class table in the log, prediction PNGs in
    ``output_dir``) that sums the areas in float64 and keeps them in ``self.totals``.

    mmseg returns mIoU rounded to two decimals; the report uses ``totals`` (rank 0 only, after
    ``evaluate``), which equal the sums of one confusion matrix over the whole set.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.totals: PixelTotals | None = None

    def compute_metrics(self, results: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, float]:
        # Per image the float32 counts are exact (< 2**24 pixels); their sum over a data set
        # is not, hence float64.
        sums = [sum(r[i].double() for r in results) for i in range(4)]
        self.totals = PixelTotals(*(s.numpy() for s in sums))
        return super().compute_metrics([tuple(sums)])

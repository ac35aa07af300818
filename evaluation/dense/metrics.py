"""One confusion matrix over a whole set, its IoUs, and cluster-to-class matching."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Pixel counts ``matrix[true, predicted]`` accumulated over a set (ignore label skipped)."""

    def __init__(self, num_true: int, num_pred: int | None = None) -> None:
        if num_true < 1:
            raise ValueError(f"need at least one class, got {num_true}")
        self.num_true = num_true
        self.num_pred = num_true if num_pred is None else num_pred
        self.matrix = np.zeros((self.num_true, self.num_pred), dtype=np.int64)

    def update(self, true: np.ndarray, pred: np.ndarray, ignore_index: int = IGNORE_INDEX) -> None:
        true, pred = np.asarray(true).ravel(), np.asarray(pred).ravel()
        if true.shape != pred.shape:
            raise ValueError(f"labels {true.shape} and predictions {pred.shape} differ")
        keep = true != ignore_index
        true, pred = true[keep].astype(np.int64), pred[keep].astype(np.int64)
        if true.size and (true.min() < 0 or true.max() >= self.num_true):
            raise ValueError(f"labels must lie in [0, {self.num_true}) or be {ignore_index}")
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_pred):
            raise ValueError(f"predictions must lie in [0, {self.num_pred})")
        flat = np.bincount(true * self.num_pred + pred, minlength=self.num_true * self.num_pred)
        self.matrix += flat.reshape(self.num_true, self.num_pred)


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
    """IoU of each class of a square confusion matrix; NaN where neither labelled nor predicted."""
    matrix = np.asarray(matrix, dtype=np.float64)
    intersect = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        return intersect / union


def miou(matrix: np.ndarray) -> float:
    """Mean IoU (percent) over the classes that occur (labelled or predicted), as mmseg."""
    iou = iou_per_class(matrix)
    return float(100 * np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def greedy_many_to_one(matrix: np.ndarray) -> np.ndarray:
    """Class of each cluster: the class it overlaps most (its precision-maximising class).

    ``matrix`` [classes, clusters]; several clusters may map to one class (overclustering).
    """
    return np.asarray(matrix).argmax(axis=0)


def hungarian_one_to_one(matrix: np.ndarray) -> np.ndarray:
    """Class of each cluster under the one-to-one matching maximising the matched pixels.

    Clusters left unmatched (more clusters than classes) get -1.
    """
    from scipy.optimize import linear_sum_assignment

    matrix = np.asarray(matrix)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    mapping = np.full(matrix.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return mapping


def matched_iou(matrix: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """IoU of each true class once each cluster is relabelled by `mapping` (-1 = no class).

    ``matrix`` [classes, clusters]. A pixel of a cluster mapped to -1 is a miss for its class
    and a prediction of no class.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    mapping = np.asarray(mapping)
    if mapping.shape != (matrix.shape[1],):
        raise ValueError(f"need one class per cluster ({matrix.shape[1]}), got {mapping.shape}")
    classes = matrix.shape[0]
    intersect, predicted = np.zeros(classes), np.zeros(classes)
    for cluster, target in enumerate(mapping):
        if target >= 0:
            intersect[target] += matrix[target, cluster]
            predicted[target] += matrix[:, cluster].sum()
    union = predicted + matrix.sum(1) - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        return intersect / union


def matched_miou(matrix: np.ndarray, mapping: np.ndarray) -> float:
    """mIoU (percent) over the true classes that occur after relabelling by `mapping`."""
    iou = matched_iou(matrix, mapping)
    return float(100 * np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

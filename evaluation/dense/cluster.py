"""Leopart's overclustering of frozen patch features (Ziegler & Asano 2022).

Test patch features are standardised (per dimension, over all patches), reduced to 50
dimensions by PCA and clustered by k-means (FAISS: 100 iterations, best of 5 restarts) for
each K and seed. The cluster maps are upsampled (nearest) to the ground truth at 100 x 100;
clusters are matched to classes greedily many-to-one when K > classes (each cluster takes the
class it overlaps most) and one-to-one by the Hungarian method when K = classes; mIoU is
computed over one confusion matrix of the whole set, then mean and std over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from densedino.evaluation.dense.metrics import (
    ConfusionMatrix,
    greedy_many_to_one,
    hungarian_one_to_one,
    matched_miou,
)
from densedino.evaluation.knn import import_faiss

GT_SIZE = 100
PCA_DIM = 50
ITERATIONS = 100
RESTARTS = 5


def standardise(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per dimension (constant dimensions left at 0), float32."""
    x = np.asarray(x, dtype=np.float32)
    std = x.std(axis=0)
    return ((x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)).astype(np.float32)


def pca(x: np.ndarray, dim: int) -> np.ndarray:
    """x projected on its `dim` leading principal components (FAISS PCAMatrix).

    With fewer points than `dim` (tiny sets), at most as many components as points are kept.
    """
    faiss = import_faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    dim = min(dim, x.shape[0])
    if dim >= x.shape[1]:
        return x
    matrix = faiss.PCAMatrix(x.shape[1], dim)
    matrix.train(x)
    return matrix.apply(x)


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int, restarts: int) -> np.ndarray:
    """Cluster ids [N] of FAISS k-means (best objective of `restarts` runs), every point
    assigned; the centroids are trained on at most 256 x k points (FAISS' default sample)."""
    faiss = import_faiss()
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"K={k} must be in [1, {x.shape[0]}] (the number of patches)")
    # FAISS' default training sample (at most 256 points per centroid, as Leopart's FAISS
    # k-means); every point is then assigned to its nearest centroid.
    model = faiss.Kmeans(x.shape[1], k, niter=iterations, nredo=restarts, seed=seed, verbose=False)
    model.train(x)
    _, ids = model.index.search(x, 1)
    return ids[:, 0]


def upsample_maps(ids: Tensor, size: int) -> Tensor:
    """Label maps [N, h, w] -> [N, size, size] by nearest neighbour."""
    return F.interpolate(ids[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def match(confusion: np.ndarray, k: int, num_classes: int) -> tuple[np.ndarray, str]:
    """(class of each cluster, method): Hungarian when K == classes, greedy when K > classes."""
    if k == num_classes:
        return hungarian_one_to_one(confusion), "hungarian"
    if k > num_classes:
        return greedy_many_to_one(confusion), "greedy"
    # Fewer clusters than classes: one-to-one still defines a score (some classes unmatched).
    return hungarian_one_to_one(confusion), "hungarian"


@dataclass
class ClusterResult:
    """mIoU (percent) per K and seed; one cluster map set kept for the figure."""

    num_classes: int
    scores: dict[int, list[float]] = field(default_factory=dict)
    methods: dict[int, str] = field(default_factory=dict)
    example_maps: dict[int, Tensor] = field(default_factory=dict)  # K -> [n, S, S] matched

    def to_json(self) -> dict[str, Any]:
        return {
            str(k): {
                "mIoU_mean": float(np.mean(v)),
                "mIoU_std": float(np.std(v)),
                "per_seed": v,
                "matching": self.methods[k],
            }
            for k, v in self.scores.items()
        }


def overcluster(
    features: Tensor,
    gt: Tensor,
    num_classes: int,
    ks: Sequence[int],
    seeds: Sequence[int],
    *,
    pca_dim: int = PCA_DIM,
    iterations: int = ITERATIONS,
    restarts: int = RESTARTS,
    keep_examples: int = 0,
) -> ClusterResult:
    """Overclustering mIoU of patch `features` [N, h, w, D] against `gt` [N, G, G] (255 ignored)."""
    n, h, w, d = features.shape
    if gt.shape[0] != n:
        raise ValueError(f"{n} feature maps but {gt.shape[0]} ground-truth maps")
    reduced = pca(standardise(features.reshape(-1, d).numpy()), pca_dim)
    result = ClusterResult(num_classes)
    for k in ks:
        for seed in seeds:
            ids = torch.from_numpy(kmeans(reduced, k, seed, iterations, restarts).astype(np.int64))
            maps = upsample_maps(ids.reshape(n, h, w), gt.shape[-1])
            confusion = ConfusionMatrix(num_classes, k)
            confusion.update(gt.numpy(), maps.numpy())
            mapping, method = match(confusion.matrix, k, num_classes)
            result.scores.setdefault(k, []).append(matched_miou(confusion.matrix, mapping))
            result.methods[k] = method
            if keep_examples and k not in result.example_maps:
                lookup = torch.from_numpy(mapping)
                result.example_maps[k] = lookup[maps[:keep_examples]]
    return result

"""`densedino-eval cluster`: greedy and Hungarian matching by hand, the matched mIoU, and
overclustering of features that carry the classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densedino.evaluation.dense import cluster
from densedino.evaluation.dense.metrics import (
    greedy_many_to_one,
    hungarian_one_to_one,
    matched_iou,
    matched_miou,
)

# rows = true classes (3), columns = clusters (4); pixel counts.
MATRIX = np.array(
    [
        [50, 10, 0, 5],
        [0, 30, 20, 0],
        [5, 0, 25, 40],
    ]
)


def test_greedy_many_to_one_by_hand() -> None:
    # Each cluster takes the class it overlaps most: 0->0, 1->1, 2->2, 3->2.
    mapping = greedy_many_to_one(MATRIX)
    assert mapping.tolist() == [0, 1, 2, 2]
    # class 0: I 50, predicted 55, labelled 65 -> 50 / 70
    # class 1: I 30, predicted 40, labelled 50 -> 30 / 60
    # class 2: I 65, predicted 90, labelled 70 -> 65 / 95
    want = [50 / 70, 30 / 60, 65 / 95]
    np.testing.assert_allclose(matched_iou(MATRIX, mapping), want)
    assert matched_miou(MATRIX, mapping) == pytest.approx(100 * np.mean(want))


def test_hungarian_one_to_one_by_hand() -> None:
    square = MATRIX[:, :3]
    # Permutations of 3: the best total is 50 + 30 + 25 = 105 (identity); check against all.
    import itertools

    best = max(
        itertools.permutations(range(3)), key=lambda p: sum(square[p[c], c] for c in range(3))
    )
    assert hungarian_one_to_one(square).tolist() == list(best) == [0, 1, 2]
    swapped = square[:, [2, 0, 1]]  # clusters relabelled: the matching follows
    assert hungarian_one_to_one(swapped).tolist() == [2, 0, 1]
    # More clusters than classes: one cluster stays unmatched (-1) and counts as missed.
    mapping = hungarian_one_to_one(MATRIX)
    assert sorted(mapping.tolist()) == [-1, 0, 1, 2] and mapping[3] == 2 and mapping[2] == -1
    # class 2 then: I 40, predicted 45 (cluster 3), labelled 70 -> 40 / 75
    assert matched_iou(MATRIX, mapping)[2] == pytest.approx(40 / 75)


def test_match_picks_the_method_by_k() -> None:
    assert cluster.match(MATRIX, 4, 3)[1] == "greedy"
    assert cluster.match(MATRIX[:, :3], 3, 3)[1] == "hungarian"


def test_standardise_and_pca() -> None:
    x = np.random.default_rng(0).normal(3.0, [1.0, 5.0, 0.1, 2.0], size=(500, 4)).astype(np.float32)
    z = cluster.standardise(x)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-4)
    assert cluster.pca(z, 2).shape == (500, 2)
    assert cluster.pca(z[:3], 2).shape == (3, 2) and cluster.pca(z[:1], 2).shape == (1, 1)


def test_features_that_carry_the_classes_cluster_perfectly() -> None:
    g = torch.Generator().manual_seed(0)
    num_classes = 3
    labels = torch.randint(0, num_classes, (10, 4, 4), generator=g)
    centres = torch.randn(num_classes, 16, generator=g) * 5
    feats = F.normalize(centres[labels] + 0.05 * torch.randn(10, 4, 4, 16, generator=g), dim=-1)
    gt = labels.repeat_interleave(5, 1).repeat_interleave(5, 2)  # 20 x 20 ground truth
    gt[0, 0, 0] = 255  # ignored
    result = cluster.overcluster(
        feats,
        gt,
        num_classes,
        [3, 6],
        [0, 1],
        pca_dim=8,
        iterations=20,
        restarts=2,
        keep_examples=2,
    )
    for k in (3, 6):
        assert result.scores[k] == [pytest.approx(100.0)] * 2
    assert result.methods == {3: "hungarian", 6: "greedy"}
    assert torch.equal(result.example_maps[3][:, 1:, 1:], gt[:2, 1:, 1:])
    noise = cluster.overcluster(
        torch.randn(10, 4, 4, 16, generator=g),
        gt,
        num_classes,
        [3],
        [0],
        pca_dim=8,
        iterations=20,
        restarts=1,
    )
    assert noise.scores[3][0] < 60

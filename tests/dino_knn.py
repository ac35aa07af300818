"""DINO's k-NN classifier (facebookresearch/dino ``eval_knn.knn_classifier``) written plainly in
torch: the oracle of the k-NN tests and the ``torch`` method of ``benchmarks/bench_knn.py``.

Imported by file name (like ``cli_runs``); the benchmark puts ``tests/`` on its path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class DinoKnn(NamedTuple):
    """Class scores [Q, C] (None unless asked for) and accuracies in %."""

    scores: torch.Tensor | None
    top1: float
    top5: float
    # Top-5 counting only classes that received votes (see dino_knn_classifier).
    top5_voted: float


def dino_knn_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    num_chunks: int = 100,
    keep_scores: bool = True,
) -> DinoKnn:
    """DINO's loop: per chunk of queries, the k most similar training features vote for their
    class with weight exp(similarity / temperature); classes are ranked by their summed votes.

    DINO's top-5 also credits a class with no vote at all when fewer than 5 classes were voted
    for: such classes tie at 0 and sort() orders them arbitrarily, so that number depends on the
    sort implementation. ``top5_voted`` drops those arbitrary hits; it is the one we report.
    ``keep_scores=False`` keeps no [Q, C] scores (the benchmark measures the loop's memory).
    """
    top1, top5, top5_voted, total = 0.0, 0.0, 0.0, 0
    train_t = train_features.t()  # DINO keeps the bank transposed, [D, N]
    num_test = test_labels.shape[0]
    per_chunk = max(1, num_test // num_chunks)
    retrieval_one_hot = torch.zeros(k, num_classes)
    all_scores = []
    for idx in range(0, num_test, per_chunk):
        features = test_features[idx : idx + per_chunk]
        targets = test_labels[idx : idx + per_chunk]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_t)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(temperature).exp_()
        probs = torch.sum(
            torch.mul(
                retrieval_one_hot.view(batch_size, -1, num_classes),
                distances_transform.view(batch_size, -1, 1),
            ),
            1,
        )
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.view(-1, 1))
        top1 += correct.narrow(1, 0, 1).sum().item()
        top5 += correct.narrow(1, 0, min(5, k)).sum().item()
        voted = correct & (probs.gather(1, predictions) > 0)
        top5_voted += voted.narrow(1, 0, min(5, k)).sum().item()
        total += batch_size
        if keep_scores:
            all_scores.append(probs)
    return DinoKnn(
        torch.cat(all_scores) if keep_scores else None,
        top1 * 100.0 / total,
        top5 * 100.0 / total,
        top5_voted * 100.0 / total,
    )

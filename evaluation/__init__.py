"""Evaluation of frozen backbones: weighted k-NN (FAISS) and the segmentation probe (``seg``).

Installed as ``densedino.evaluation`` (``evaluation/`` in the repository).
"""

from densedino.evaluation.features import (
    DistContext,
    FeatureSet,
    ImageList,
    eval_transform,
    extract_features,
    scan_image_folder,
)
from densedino.evaluation.knn import (
    IndexSpec,
    KnnAccuracy,
    build_index,
    exact_neighbours,
    index_recall,
    knn_evaluate,
    knn_predict,
)

__all__ = [
    "DistContext",
    "FeatureSet",
    "ImageList",
    "IndexSpec",
    "KnnAccuracy",
    "build_index",
    "eval_transform",
    "exact_neighbours",
    "extract_features",
    "index_recall",
    "knn_evaluate",
    "knn_predict",
    "scan_image_folder",
]

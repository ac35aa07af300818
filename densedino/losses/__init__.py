"""Losses: DINO's CLS loss, DenseDINO's reference loss and the centering they share, SelfPatch's
patch loss and DenseCL's InfoNCE with its queue."""

from densedino.losses.centering import Center
from densedino.losses.densecl import KeyQueue, concat_all_gather, dense_correspondence, info_nce
from densedino.losses.dino import DINOLoss, default_pairs
from densedino.losses.reference import ReferenceLoss, combine
from densedino.losses.selfpatch import PatchLoss

__all__ = [
    "Center",
    "DINOLoss",
    "KeyQueue",
    "PatchLoss",
    "ReferenceLoss",
    "combine",
    "concat_all_gather",
    "default_pairs",
    "dense_correspondence",
    "info_nce",
]

"""Losses: DINO's CLS loss, DenseDINO's reference loss and the centering they share."""

from densedino.losses.centering import Center
from densedino.losses.dino import DINOLoss, default_pairs
from densedino.losses.reference import ReferenceLoss, combine

__all__ = ["Center", "DINOLoss", "ReferenceLoss", "combine", "default_pairs"]

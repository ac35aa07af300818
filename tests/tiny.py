"""Tiny method settings for the tests (imported by file name, like ``cli_runs``): a ViT-Tiny of
2 blocks on 32 px inputs with small heads, so that a training step takes milliseconds.

Tests that need another size override a key, e.g. ``dict(TINY_DINO, patch_size=16)``.
"""

from __future__ import annotations

from typing import Any

# The backbone every tiny method shares: 4 x 4 patches of 8 px at 32 px, no stochastic depth.
_BACKBONE: dict[str, Any] = dict(
    arch="vit_tiny", patch_size=8, drop_path_rate=0.0, backbone=dict(img_size=32, depth=2)
)

# DINO and DenseDINO (and the DINO part of SelfPatch): 64 prototypes, small head MLP.
TINY_DINO: dict[str, Any] = dict(_BACKBONE, out_dim=64, head=dict(hidden_dim=32, bottleneck_dim=16))
TINY_SELFPATCH: dict[str, Any] = dict(TINY_DINO, patch_out_dim=32)
# DenseCL: 16-d projections, queues of 10 keys.
TINY_DENSECL: dict[str, Any] = dict(_BACKBONE, feat_dim=16, hidden_dim=32, queue_len=10)

"""A frozen DenseDINO/DINO/timm ViT as an mmsegmentation backbone: last-layer patch tokens."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor

from densedino.models.vit import VisionTransformer
from densedino.weights import load_backbone


@MODELS.register_module()
class FrozenViTBackbone(BaseModule):
    """Any checkpoint :func:`densedino.weights.load_backbone` reads, frozen and in eval mode.

    ``forward(images [B, 3, H, W])`` returns ``(patch_map,)`` with ``patch_map`` [B, D, h, w]:
    the last-layer patch tokens after the final norm, on the h x w patch grid (method
    reference, section 3). Images whose sides are not multiples of the patch size are resized
    up to the next multiple first, so that the map still covers exactly the image and logits
    resized back to the image stay aligned (sliding-window crops at a border, odd test sizes).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        arch: str | None = None,
        which: str = "teacher",
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg)
        self.checkpoint = str(checkpoint)
        self.vit: VisionTransformer = load_backbone(checkpoint, arch=arch, which=which)
        self.vit.requires_grad_(False)
        self.vit.eval()

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_size

    def init_weights(self) -> None:
        """Nothing to initialise: the weights come from the checkpoint (never re-drawn)."""

    def train(self, mode: bool = True) -> FrozenViTBackbone:
        """Stay in eval mode: the Runner calls ``model.train()`` every epoch."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor]:
        """``(patch tokens [B, D, h, w],)``; no gradient ever flows into the backbone."""
        patch = self.patch_size
        height, width = images.shape[-2:]
        fit = (math.ceil(height / patch) * patch, math.ceil(width / patch) * patch)
        if fit != (height, width):
            images = F.interpolate(images, size=fit, mode="bilinear", align_corners=False)
        tokens = self.vit.forward_features(images)["patch"]
        return (tokens.permute(0, 3, 1, 2).contiguous(),)

"""A frozen DenseDINO/DINO/timm ViT as an mmsegmentation backbone: last-layer patch tokens."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor

from densedino.evaluation.backbone import BackboneSpec, patch_tokens


@MODELS.register_module()
class FrozenViTBackbone(BaseModule):
    """The ViT of ``checkpoint`` (anything :func:`densedino.weights.load_backbone` reads), or
    timm's ViT ``timm`` with the file ``weights`` (as ``--timm NAME --weights FILE``), frozen
    and in eval mode.

    ``forward(images [B, 3, H, W])`` returns ``(patch_map,)`` with ``patch_map`` [B, D, h, w]:
    the last-layer patch tokens after the final norm (CLS and register tokens dropped), on the
    h x w patch grid (method reference, section 3). The patch size and D are the model's own
    (14 and 384 for a DINOv2 ViT-S/14). Images whose sides are not multiples of the patch size
    are resized up to the next multiple first, so that the map still covers exactly the image
    and logits resized back to the image stay aligned (sliding-window crops at a border, odd
    test sizes).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str] | None = None,
        arch: str | None = None,
        which: str = "teacher",
        timm: str | None = None,
        weights: str | os.PathLike[str] | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg)
        spec = BackboneSpec(
            checkpoint=None if checkpoint is None else Path(checkpoint),
            timm_name=timm,
            weights=None if weights is None else Path(weights),
            arch=arch,
            which=which,
        )
        backbone = spec.load()
        self.checkpoint = str(spec.file)
        self.kind = backbone.kind
        self._patch_size = backbone.patch_size
        self._embed_dim = backbone.embed_dim
        self.vit = backbone.model  # registered here, so that the Runner moves it

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def patch_size(self) -> int:
        return self._patch_size

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
        tokens = patch_tokens(self.vit, self.kind, patch, images)
        return (tokens.permute(0, 3, 1, 2).contiguous(),)

"""The linear decode head: a 1x1 convolution on the patch-token map (optionally after BN)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from mmseg.utils import ConfigType, SampleList
from torch import Tensor, nn


@MODELS.register_module()
class LinearProbeHead(BaseDecodeHead):
    """Per-pixel linear classifier on frozen features.

    Two protocols (method reference, section 3):

    - Leopart (``train_size=(100, 100)``, no norm): in training the features are bilinearly
      upsampled to ``train_size`` *before* the 1x1 conv and the labels are nearest-resized to
      the same size; the cross-entropy is taken there.
    - DINOv2 linear (``norm_cfg=dict(type="SyncBN")``, ``train_size=None``): BN + 1x1 conv on the
      patch grid; mmseg's loss upsamples the logits to the label size.

    At test time the logits are computed on the patch grid and resized bilinearly to the input
    size by mmseg. For Leopart's evaluation (features upsampled to the input size, then the
    conv) this is the same map: a 1x1 conv, and BN in eval mode, are per-pixel affine maps and
    bilinear weights sum to one, so they commute with the upsampling; working on the grid saves
    a D x H x W feature map per image.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        train_size: Sequence[int] | None = None,
        norm_cfg: ConfigType | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("dropout_ratio", 0.0)
        super().__init__(
            in_channels, in_channels, num_classes=num_classes, norm_cfg=norm_cfg, **kwargs
        )
        if train_size is not None:
            train_size = tuple(int(s) for s in train_size)
            if len(train_size) != 2 or min(train_size) < 1:
                raise ValueError(f"train_size must be (height, width) >= 1, got {train_size}")
        self.train_size: tuple[int, int] | None = train_size
        self.norm: nn.Module = (
            build_norm_layer(norm_cfg, in_channels)[1] if norm_cfg is not None else nn.Identity()
        )

    def forward(self, inputs: Sequence[Tensor], size: Sequence[int] | None = None) -> Tensor:
        """Logits [B, classes, h, w] on the patch grid, or at ``size`` (upsample, then conv)."""
        features = self._transform_inputs(inputs)
        if size is not None:
            features = resize(
                features, size=tuple(size), mode="bilinear", align_corners=self.align_corners
            )
        return self.cls_seg(self.norm(features))

    def loss(self, inputs: Sequence[Tensor], batch_data_samples: SampleList, train_cfg) -> dict:
        """Cross-entropy at ``train_size`` (Leopart) or at the label size (DINOv2)."""
        logits = self.forward(inputs, self.train_size)
        return self.loss_by_feat(logits, batch_data_samples)

    def _stack_batch_gt(self, batch_data_samples: SampleList) -> Tensor:
        """Labels [B, 1, H, W], nearest-resized to ``train_size`` when it is set."""
        labels = super()._stack_batch_gt(batch_data_samples)
        if self.train_size is None or tuple(labels.shape[-2:]) == self.train_size:
            return labels
        # Nearest keeps label values (and 255 = ignore) intact; float because interpolate
        # has no integer kernel.
        resized = F.interpolate(labels.float(), size=self.train_size, mode="nearest")
        return resized.to(labels.dtype)

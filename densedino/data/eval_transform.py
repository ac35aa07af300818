"""Inference preprocessing, shared by evaluation and serving.

- :func:`eval_transform`: DINO's k-NN transform (bicubic resize of the short side, center crop,
  ImageNet normalisation) for image folders.
- :func:`model_input`: a PIL image resized to an exact (height, width) and normalised, the
  input of the HTTP API and of the dense protocols.
- :func:`normalize` / :func:`denormalize`: uint8 pixels <-> normalised model input, the one
  place where the ImageNet statistics are applied.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms

from densedino.data.constants import IMAGENET_MEAN, IMAGENET_STD

DINO_RESIZE, DINO_CROP = 256, 224


def eval_transform(resize: int = DINO_RESIZE, crop: int = DINO_CROP) -> transforms.Compose:
    """DINO's k-NN transform: bicubic resize of the short side, center crop, ImageNet norm."""
    if crop < 1 or resize < crop:
        raise ValueError(f"need 1 <= crop <= resize, got resize={resize}, crop={crop}")
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def resize_for_crop(crop: int) -> int:
    """DINO's resize/crop ratio (256/224) applied to another crop, e.g. 128 -> 146."""
    return round(crop * DINO_RESIZE / DINO_CROP)


def _stats(like: Tensor) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std as [3, 1, 1] float32 tensors on the device of `like`."""
    mean = torch.tensor(IMAGENET_MEAN, device=like.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=like.device).view(3, 1, 1)
    return mean, std


def normalize(pixels: Tensor) -> Tensor:
    """uint8 (or 0-255 valued) pixels [..., 3, H, W] -> float32, scaled to [0, 1] and
    ImageNet-normalised (what torchvision's ``ToTensor`` + ``Normalize`` compute)."""
    mean, std = _stats(pixels)
    return (pixels.float() / 255 - mean) / std


def denormalize(x: Tensor) -> Tensor:
    """Normalised [..., 3, H, W] back to pixels in [0, 1] (not clamped)."""
    mean, std = _stats(x)
    return x * std + mean


def image_to_tensor(image: Image.Image | np.ndarray) -> Tensor:
    """An RGB image (PIL or uint8 [H, W, 3]) -> normalised [3, H, W], size unchanged."""
    array = np.asarray(image, dtype=np.uint8)
    return normalize(torch.from_numpy(np.ascontiguousarray(array).copy()).permute(2, 0, 1))


def model_input(image: Image.Image, height: int, width: int) -> Tensor:
    """RGB image -> model input [3, height, width]: PIL bicubic resize, ImageNet mean/std.

    Equal to torchvision's ``Resize((height, width), BICUBIC)``, ``ToTensor``, ``Normalize``.
    """
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image_to_tensor(image)

"""DINO's photometric augmentation on float images in [0, 1], with its own blur and hue kernels.

Recipe (facebookresearch/dino, DataAugmentationDINO): colour jitter (0.4, 0.4, 0.2, 0.1) with
p = 0.8 in a random order, grayscale p = 0.2, Gaussian blur sigma U(0.1, 2) (kernel
2 * ceil(3 sigma) + 1, reflect padding; PIL's GaussianBlur(radius=sigma) uses sigma as the
standard deviation) with p = 1.0 on global view 1, 0.1 on global view 2 and any further global
view, 0.5 on local views; solarize (threshold 128) with p = 0.2 on global views 2 and beyond.

Brightness, contrast, saturation, grayscale and solarize are torchvision v2's functional ops;
hue and Gaussian blur are written here, equal to torchvision's to 1e-5 and 2-4x faster. Working
in float between the ops skips a uint8 round trip per op (PIL rounds after each op; the
difference is below half a grey level per op).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

# DINO's photometric recipe (facebookresearch/dino, DataAugmentationDINO).
_JITTER_P = 0.8
_BRIGHTNESS = 0.4
_CONTRAST = 0.4
_SATURATION = 0.2
DINO_HUE = 0.1
DINO_GRAYSCALE_P = 0.2
_SIGMA_RANGE = (0.1, 2.0)
# PIL inverts uint8 values >= 128, i.e. floats that would round to 128 or more.
_SOLARIZE_THRESHOLD = 127.5 / 255

# Uniform draws one view needs: [jitter?, brightness, contrast, saturation, hue, grayscale?,
# blur?, sigma, solarize?]; plus a random order of the 4 jitter ops.
NUM_DRAWS = 9
NUM_JITTER_OPS = 4


@dataclass(frozen=True)
class Recipe:
    """Per-view probabilities of the two view-dependent photometric ops."""

    blur_p: float
    solarize_p: float


_GLOBAL_1 = Recipe(blur_p=1.0, solarize_p=0.0)
# Also used for global views beyond the second one.
_GLOBAL_2 = Recipe(blur_p=0.1, solarize_p=0.2)
_LOCAL = Recipe(blur_p=0.5, solarize_p=0.0)


def view_recipe(view: int, num_global: int) -> Recipe:
    """DINO's recipe of view ``view`` (globals first): global 1, global 2 and beyond, local."""
    if view == 0:
        return _GLOBAL_1
    return _GLOBAL_2 if view < num_global else _LOCAL


def _blur_kernel_size(sigma: float) -> int:
    """Odd kernel covering +-3 sigma (PIL's GaussianBlur(radius=sigma) uses sigma = radius)."""
    return 2 * math.ceil(3.0 * sigma) + 1


def _blur_matrix(size: int, sigma: float) -> Tensor:
    """``[size, size]`` matrix applying a 1-D Gaussian with reflect padding along one axis.

    Row i holds the weights of the taps around pixel i; taps falling outside are reflected
    (``torch.nn.functional.pad(mode="reflect")``, as torchvision's gaussian_blur pads).
    """
    kernel_size = _blur_kernel_size(sigma)
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).expand(size, -1).contiguous()
    taps = (torch.arange(size)[:, None] + offsets).abs()
    taps = torch.where(taps > size - 1, 2 * (size - 1) - taps, taps)
    # Images smaller than the kernel radius would need several reflections.
    taps = taps.clamp(0, size - 1)
    return torch.zeros(size, size).scatter_add_(1, taps, weights)


def gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of a float image [3, H, W], kernel size ``2 * ceil(3 sigma) + 1``.

    Same result as ``torchvision.transforms.v2.functional.gaussian_blur`` with that kernel but
    separable, as two matrix products: several times faster on CPU.
    """
    rows = _blur_matrix(img.shape[-2], sigma)
    cols = rows if img.shape[-1] == img.shape[-2] else _blur_matrix(img.shape[-1], sigma)
    return rows @ (img @ cols.T)


def adjust_hue(img: Tensor, shift: float) -> Tensor:
    """Rotate the hue of a float RGB image [3, H, W] in [0, 1] by ``shift`` turns.

    The HSV round trip of torchvision's adjust_hue (and PIL's) written directly: value and
    chroma are kept, the hue sextant moves; about 2x faster than torchvision's version.
    """
    red, green, blue = img.unbind(0)
    maxc = torch.maximum(torch.maximum(red, green), blue)
    chroma = maxc - torch.minimum(torch.minimum(red, green), blue)
    inv = 1.0 / torch.where(chroma > 0, chroma, 1.0)
    hue = torch.where(
        maxc == red,
        (green - blue) * inv,
        torch.where(maxc == green, (blue - red) * inv + 2.0, (red - green) * inv + 4.0),
    )
    hue = hue + 6.0 * shift  # in sextants
    sextant = torch.stack([hue + 5.0, hue + 3.0, hue + 1.0]).remainder_(6.0)
    weight = torch.minimum(sextant, 4.0 - sextant).clamp_(0.0, 1.0)
    return maxc - chroma * weight


def _color_jitter(img: Tensor, draws: list[float], order: list[int], hue: float) -> Tensor:
    """DINO's ColorJitter(0.4, 0.4, 0.2, hue) with factors from ``draws`` (4 uniforms)."""
    for op in order:
        if op == 0:
            img = TF.adjust_brightness(img, 1 + _BRIGHTNESS * (2 * draws[0] - 1))
        elif op == 1:
            img = TF.adjust_contrast(img, 1 + _CONTRAST * (2 * draws[1] - 1))
        elif op == 2:
            img = TF.adjust_saturation(img, 1 + _SATURATION * (2 * draws[2] - 1))
        else:
            img = adjust_hue(img, hue * (2 * draws[3] - 1))
    return img


def photometric(
    img: Tensor,
    draws: list[float],
    order: list[int],
    recipe: Recipe,
    hue: float = DINO_HUE,
    grayscale_p: float = DINO_GRAYSCALE_P,
) -> Tensor:
    """Jitter, grayscale, blur and solarize a float view in [0, 1] as DINO does.

    ``draws``: the view's ``NUM_DRAWS`` uniforms in [0, 1) (layout above ``NUM_DRAWS``);
    ``order``: a permutation of the 4 jitter ops (brightness, contrast, saturation, hue).
    """
    if draws[0] < _JITTER_P:
        img = _color_jitter(img, draws[1:5], order, hue)
    if draws[5] < grayscale_p:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if draws[6] < recipe.blur_p:
        sigma = _SIGMA_RANGE[0] + (_SIGMA_RANGE[1] - _SIGMA_RANGE[0]) * draws[7]
        img = gaussian_blur(img, sigma)
    if draws[8] < recipe.solarize_p:
        img = TF.solarize(img, threshold=_SOLARIZE_THRESHOLD)
    return img

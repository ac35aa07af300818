"""Multi-view augmentation for DINO / DenseDINO: :class:`MultiViewTransform` turns one image into
``V`` views (globals first, then locals) with their crop boxes, flips and reference points.

The pieces live by name: :mod:`~densedino.data.view_config` (which views, presets),
:mod:`~densedino.data.crops` (crop boxes and the overlap bound),
:mod:`~densedino.data.reference_points` (the points shared by pairs of views),
:mod:`~densedino.data.photometric` (DINO's colour recipe) and :mod:`~densedino.data.collate`
(batches, normalisation on the device).

Pixels are cropped and resized as uint8 tensors (torchvision v2 ``resized_crop``, bicubic +
antialias, like DINO's RandomResizedCrop), converted once to float in [0, 1], put through the
photometric recipe there, then normalised. Every random draw goes through the optional
``torch.Generator`` (or torch's global RNG).

``MultiViewTransform(cfg, dtype="uint8")`` (the training data's) stops before the
normalisation: it rounds the photometric pipeline's result to uint8 once at its end (as a PIL
pipeline's ``ToTensor`` sees it) and records the mean and std in ``pixel_norm``;
:func:`densedino.data.collate.normalize_views` turns the batch into normalised float views on
the device it sits on. A uint8 view is a quarter of the bytes to copy from the loader workers
and to the device.
"""

from __future__ import annotations

from typing import Any, Literal

import PIL.Image
import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from densedino.data.crops import sample_view_boxes
from densedino.data.photometric import NUM_DRAWS, NUM_JITTER_OPS, photometric, view_recipe
from densedino.data.reference_points import grid_positions, random_positions, reference_points
from densedino.data.view_config import ViewConfig


def _to_uint8_chw(image: Tensor | PIL.Image.Image) -> Tensor:
    """The image as a uint8 RGB tensor [3, H, W]; PIL images are converted once."""
    if isinstance(image, PIL.Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return TF.pil_to_tensor(image)
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a uint8 tensor [3, H, W] or a PIL image, got {type(image)}")
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"image tensor must be uint8 [3, H, W] (or [1, H, W]), got {image.dtype} "
            f"{list(image.shape)}"
        )
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"image is empty: {list(image.shape)}")
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


ViewDType = Literal["float32", "uint8"]


def quantize(view: Tensor) -> Tensor:
    """A float view in [0, 1] as uint8 (round to the nearest grey level), contiguous."""
    return view.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8).contiguous()


class MultiViewTransform:
    """Image -> dict of views, boxes, flips and DenseDINO reference points (see module doc).

    ``dtype``: ``float32`` gives normalised float views; ``uint8`` gives the views before the
    normalisation, rounded to uint8, plus ``pixel_norm`` (mean and std) for
    :func:`densedino.data.collate.normalize_views`.

    ``num_fallbacks`` counts, over the life of this object (per process), the crops that fell
    back after ``max_tries`` candidates; each call also returns its own count.
    """

    def __init__(self, cfg: ViewConfig, dtype: ViewDType = "float32") -> None:
        if dtype not in ("float32", "uint8"):
            raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
        self.cfg = cfg
        self.dtype = dtype
        self.num_fallbacks = 0
        self._sizes = cfg.view_sizes
        self._recipes = [view_recipe(v, cfg.num_global) for v in range(cfg.num_views)]
        self._mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self._std = torch.tensor(cfg.std).view(3, 1, 1)
        self._pixel_norm = torch.tensor([cfg.mean, cfg.std])

    def __call__(
        self, image: Tensor | PIL.Image.Image, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Make the views of one image.

        Returns ``views`` (list of V float32 [3, S_v, S_v], or uint8 with ``dtype="uint8"``),
        ``boxes`` [V, 4] (x0, y0, x1, y1 in original pixels), ``flips`` [V] bool, ``points``
        [V, V, K', 2] float32, ``num_fallbacks`` (int64 scalar tensor) and, for uint8 views,
        ``pixel_norm`` [2, 3] (mean; std).
        """
        cfg = self.cfg
        img = _to_uint8_chw(image)
        if img.stride(0) != 1:
            # Pixel-interleaved (HWC) storage makes the uint8 bicubic resize ~2x faster and is
            # what PIL conversion already gives; one copy of the image otherwise.
            img = img.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        height, width = int(img.shape[1]), int(img.shape[2])
        boxes, fallbacks = sample_view_boxes(cfg, height, width, generator)
        self.num_fallbacks += fallbacks
        num_views = cfg.num_views
        flips = torch.rand(num_views, generator=generator) < cfg.flip_p
        if cfg.photometric:
            draws = torch.rand(num_views, NUM_DRAWS, generator=generator).tolist()
            orders = torch.rand(num_views, NUM_JITTER_OPS, generator=generator)
            orders = orders.argsort(dim=1).tolist()
        views = []
        box_list = boxes.to(torch.int64).tolist()
        flip_list = flips.tolist()
        for v in range(num_views):
            x0, y0, x1, y1 = box_list[v]
            size = self._sizes[v]
            view = TF.resized_crop(
                img,
                y0,
                x0,
                y1 - y0,
                x1 - x0,
                [size, size],
                interpolation=InterpolationMode.BICUBIC,
                antialias=True,
            )
            if flip_list[v]:
                view = TF.horizontal_flip(view)
            if self.dtype == "uint8" and not cfg.photometric:
                # contiguous(): an un-resized crop keeps the image's pixel-interleaved strides.
                views.append(view.contiguous())
                continue
            view = view.float().div_(255.0)
            if cfg.photometric:
                view = photometric(
                    view, draws[v], orders[v], self._recipes[v], cfg.hue, cfg.grayscale_p
                )
            if self.dtype == "uint8":
                views.append(quantize(view))
            else:
                views.append(((view - self._mean) / self._std).contiguous())
        if cfg.point_mode == "grid" and cfg.grid_side is not None:
            positions = grid_positions(cfg.grid_side)
        else:
            positions = random_positions(num_views, cfg.num_points, generator)
        points = reference_points(boxes, flips, cfg.num_teacher, positions)
        out = {
            "views": views,
            "boxes": boxes,
            "flips": flips,
            "points": points,
            "num_fallbacks": torch.tensor(fallbacks, dtype=torch.int64),
        }
        if self.dtype == "uint8":
            out["pixel_norm"] = self._pixel_norm.clone()
        return out

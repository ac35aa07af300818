"""Multi-view augmentation for DINO / DenseDINO: crops with boxes, flips, an overlap bound and
reference points shared by pairs of views.

One call of :class:`MultiViewTransform` turns an image into ``V`` views (globals first, then
locals) and records, for every view, its crop box in original-image pixels and whether it was
flipped. From these it derives the DenseDINO reference points: for each pair of views that
involves a teacher view, points drawn inside the two crops' overlap box, expressed in each
view's own normalised frame, so that both sides point at the same image location.

Geometry runs on small tensors. Pixels are cropped and resized as uint8 tensors (torchvision v2
``resized_crop``, bicubic + antialias, like DINO's RandomResizedCrop), converted once to float in
[0, 1], colour-jittered there (torchvision v2 functional brightness/contrast/saturation/grayscale/
solarize; hue and Gaussian blur are written here, equal to torchvision's to 1e-5 and 2-4x faster),
then normalised. Float in place of uint8 between the ops skips a uint8 round trip per op (PIL
rounds after each op; the difference is below half a grey level per op). Every random draw goes
through the optional ``torch.Generator`` (or torch's global RNG).

``MultiViewTransform(cfg, dtype="uint8")`` (the training data's) stops before the
normalisation: it rounds the photometric pipeline's result to uint8 once at its end (as a PIL
pipeline's ``ToTensor`` sees it) and records the mean and std in ``pixel_norm``;
:func:`normalize_views` turns the batch into normalised float views on the device it sits on.
A uint8 view is a quarter of the bytes to copy from the loader workers and to the device.

Photometric recipe (DINO): colour jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8 in a random order,
grayscale p = 0.2, Gaussian blur sigma U(0.1, 2) (kernel 2 * ceil(3 sigma) + 1, reflect padding;
PIL's GaussianBlur(radius=sigma) uses sigma as the standard deviation) with p = 1.0 on global
view 1, 0.1 on global view 2 and any further global view, 0.5 on local views; solarize
(threshold 128) with p = 0.2 on global views 2 and beyond.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import PIL.Image
import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from densedino.data.constants import IMAGENET_MEAN, IMAGENET_STD

# torchvision's RandomResizedCrop.get_params tries this many (area, ratio) draws per crop
# before falling back to a centre crop.
_RRC_ATTEMPTS = 10
# Candidate crops drawn at once while looking for one that meets the overlap bound; most crops
# pass at the first try, so a small chunk keeps the random draws cheap.
_CANDIDATE_CHUNK = 8

# DINO's photometric recipe (facebookresearch/dino, DataAugmentationDINO).
_JITTER_P = 0.8
_BRIGHTNESS = 0.4
_CONTRAST = 0.4
_SATURATION = 0.2
_HUE = 0.1
_GRAYSCALE_P = 0.2
_SIGMA_RANGE = (0.1, 2.0)
# PIL inverts uint8 values >= 128, i.e. floats that would round to 128 or more.
_SOLARIZE_THRESHOLD = 127.5 / 255


@dataclass(frozen=True)
class _Recipe:
    """Per-view probabilities of the two view-dependent photometric ops."""

    blur_p: float
    solarize_p: float


_GLOBAL_1 = _Recipe(blur_p=1.0, solarize_p=0.0)
# Also used for global views beyond the second one.
_GLOBAL_2 = _Recipe(blur_p=0.1, solarize_p=0.2)
_LOCAL = _Recipe(blur_p=0.5, solarize_p=0.0)


def _as_pair(value: Sequence[float], name: str) -> tuple[float, float]:
    """Return ``value`` as a tuple of two floats or raise a ValueError naming ``name``."""
    pair = tuple(float(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must have 2 values, got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class ViewConfig:
    """Which views to make and how.

    The first ``num_teacher`` views are the teacher views (they are global views). Every crop is
    re-sampled (at most ``max_tries`` candidates) until its intersection with each earlier global
    crop exceeds ``min_intersection`` (``min_intersection_global`` between two global crops) times
    the image area; when no candidate does, the crop falls back to the smallest box containing
    all earlier global crops (it maximises every intersection, so it meets the bound whenever any
    box can) and the fallback is counted.

    ``num_points`` is K: ``random`` draws K points per pair, ``grid`` takes the K x K cell centres
    of the overlap box (row-major, x fastest), so K * K points per pair.

    ``hue`` (maximum hue shift, a fraction of the colour wheel) and ``grayscale_p`` default to
    DINO's 0.1 and 0.2; data whose colours carry no meaning can ask for stronger ones.
    """

    num_global: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    num_local: int = 0
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    num_teacher: int = 2
    num_points: int = 4
    point_mode: Literal["random", "grid"] = "random"
    min_intersection: float = 0.01
    min_intersection_global: float = 0.02
    max_tries: int = 100
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    photometric: bool = True
    hue: float = _HUE
    grayscale_p: float = _GRAYSCALE_P
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise list inputs (e.g. from config files) to tuples in place.
        for name in ("global_scale", "local_scale", "ratio"):
            object.__setattr__(self, name, _as_pair(getattr(self, name), name))
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {values!r}")
            object.__setattr__(self, name, values)
        self._validate()

    def _validate(self) -> None:
        """Raise a ValueError describing the first invalid field."""
        if self.num_global < 1:
            raise ValueError(f"num_global must be >= 1, got {self.num_global}")
        if self.num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {self.num_local}")
        if not 1 <= self.num_teacher <= self.num_global:
            raise ValueError(
                f"num_teacher must be in [1, num_global={self.num_global}] (teacher views are "
                f"global views), got {self.num_teacher}"
            )
        for name in ("global_size", "local_size", "num_points", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if self.point_mode not in ("random", "grid"):
            raise ValueError(f"point_mode must be 'random' or 'grid', got {self.point_mode!r}")
        for name in ("min_intersection", "min_intersection_global"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("flip_p", "grayscale_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(
                f"hue must be in [0, 0.5] (a fraction of the colour wheel), got {self.hue}"
            )
        if any(s <= 0.0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def num_views(self) -> int:
        """Total number of views V."""
        return self.num_global + self.num_local

    @property
    def points_per_pair(self) -> int:
        """K' = K in random mode, K * K in grid mode."""
        return self.num_points if self.point_mode == "random" else self.num_points**2

    @property
    def view_sizes(self) -> tuple[int, ...]:
        """Side length in pixels of each view, globals first."""
        return (self.global_size,) * self.num_global + (self.local_size,) * self.num_local

    @classmethod
    def dino(cls, num_local: int = 8) -> ViewConfig:
        """DINO multi-crop: 2 global 224 px views (scale 0.4-1) + ``num_local`` 96 px views."""
        return cls(
            num_global=2,
            num_local=num_local,
            global_scale=(0.4, 1.0),
            local_scale=(0.05, 0.4),
            global_size=224,
            local_size=96,
        )

    @classmethod
    def paper(cls) -> ViewConfig:
        """DenseDINO paper: 4 global 224 px views (2 teachers), 4 random points per pair.

        Views 3 and 4 follow DINO's global-2 recipe and the 2 % global overlap bound.
        """
        return cls(num_global=4, num_local=0, num_teacher=2, num_points=4, point_mode="random")

    @classmethod
    def authors(cls) -> ViewConfig:
        """The authors' README recipe: 2 teacher views + 4 more views, all 224 px, scale 0.25-1.

        The 4 extra views are the code's "local" crops (local recipe, 1 % overlap bound).
        Their ``--num_reference 2`` draws 2 random points per pair: in random mode
        ``sampling_reference_point`` (main_dino.py) draws ``num_reference`` points; only grid
        mode uses k x k (the flag's help text, "Use k*k points in actual", is wrong).
        """
        return cls(
            num_global=2,
            num_local=4,
            global_size=224,
            local_size=224,
            global_scale=(0.25, 1.0),
            local_scale=(0.25, 1.0),
            num_teacher=2,
            num_points=2,
            point_mode="random",
        )


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _centre_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """Width and height of torchvision RandomResizedCrop's fallback centre crop."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return width, round(width / ratio[0])
    if in_ratio > ratio[1]:
        return round(height * ratio[1]), height
    return width, height


def sample_crop_boxes(
    num: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``num`` RandomResizedCrop boxes ``[num, 4]`` (x0, y0, x1, y1) in integer pixels.

    Same distribution as torchvision's ``RandomResizedCrop.get_params``: up to 10 (area, log
    ratio) draws, the first that fits wins, else a centre crop; vectorised over ``num``.
    """
    draws = torch.rand(num, _RRC_ATTEMPTS, 2, generator=generator, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt
    any_fit = fits.any(dim=1)
    centre_w, centre_h = _centre_crop_size(height, width, ratio)
    w = torch.where(any_fit, w.gather(1, first).squeeze(1), float(centre_w))
    h = torch.where(any_fit, h.gather(1, first).squeeze(1), float(centre_h))
    pos = torch.rand(num, 2, generator=generator, dtype=torch.float64)
    x0 = torch.where(any_fit, torch.floor(pos[:, 0] * (width - w + 1)), (width - w) // 2)
    y0 = torch.where(any_fit, torch.floor(pos[:, 1] * (height - h + 1)), (height - h) // 2)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1).float()


def intersection_area(a: Tensor, b: Tensor) -> Tensor:
    """Area of the intersection of boxes ``a`` and ``b`` (broadcast over leading dims)."""
    wh = torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])
    return wh.clamp(min=0).prod(dim=-1)


def _enclosing_box(boxes: Tensor) -> Tensor:
    """Smallest box ``[4]`` containing every box of ``boxes [N, 4]``."""
    return torch.cat([boxes[:, :2].amin(dim=0), boxes[:, 2:].amax(dim=0)])


def _sample_constrained(
    num: int,
    anchors: Tensor,
    min_area: float,
    height: int,
    width: int,
    scale: tuple[float, float],
    cfg: ViewConfig,
    generator: torch.Generator | None,
) -> tuple[Tensor, int]:
    """Draw ``num`` crops whose intersection with every ``anchors`` box exceeds ``min_area``.

    Each crop gets at most ``cfg.max_tries`` candidates; crops still unmatched fall back to the
    box enclosing all anchors. Returns the boxes ``[num, 4]`` and the number of fallbacks.
    """
    out = torch.empty(num, 4)
    pending = torch.arange(num)
    tried = 0
    while pending.numel() > 0 and tried < cfg.max_tries:
        chunk = min(_CANDIDATE_CHUNK, cfg.max_tries - tried)
        cand = sample_crop_boxes(
            pending.numel() * chunk, height, width, scale, cfg.ratio, generator
        ).view(pending.numel(), chunk, 4)
        ok = (intersection_area(cand[:, :, None], anchors) > min_area).all(dim=-1)  # [P, chunk]
        found = ok.any(dim=1)
        first = ok.to(torch.uint8).argmax(dim=1)
        out[pending[found]] = cand[torch.arange(pending.numel()), first][found]
        pending = pending[~found]
        tried += chunk
    if pending.numel() > 0:
        out[pending] = _enclosing_box(anchors)
    return out, int(pending.numel())


def sample_view_boxes(
    cfg: ViewConfig, height: int, width: int, generator: torch.Generator | None = None
) -> tuple[Tensor, int]:
    """Crop boxes ``[V, 4]`` of all views (globals, then locals) and the number of fallbacks.

    Global crops are drawn in order, each against the earlier global crops with the global
    bound; local crops are then drawn (together) against all global crops with the local bound.
    """
    image_area = float(height * width)
    boxes = torch.empty(cfg.num_views, 4)
    boxes[:1] = sample_crop_boxes(1, height, width, cfg.global_scale, cfg.ratio, generator)
    fallbacks = 0
    for g in range(1, cfg.num_global):
        boxes[g : g + 1], n = _sample_constrained(
            1,
            boxes[:g],
            cfg.min_intersection_global * image_area,
            height,
            width,
            cfg.global_scale,
            cfg,
            generator,
        )
        fallbacks += n
    if cfg.num_local > 0:
        boxes[cfg.num_global :], n = _sample_constrained(
            cfg.num_local,
            boxes[: cfg.num_global],
            cfg.min_intersection * image_area,
            height,
            width,
            cfg.local_scale,
            cfg,
            generator,
        )
        fallbacks += n
    return boxes, fallbacks


def pair_mask(num_views: int, num_teacher: int) -> Tensor:
    """Bool ``[V, V]``: True where the pair (a, b) has reference points (a != b, one teacher)."""
    idx = torch.arange(num_views)
    teacher = idx < num_teacher
    return (teacher[:, None] | teacher[None, :]) & (idx[:, None] != idx[None, :])


def reference_points(
    boxes: Tensor,
    flips: Tensor,
    num_teacher: int,
    num_points: int,
    point_mode: Literal["random", "grid"] = "random",
    generator: torch.Generator | None = None,
) -> Tensor:
    """DenseDINO reference points ``[V, V, K', 2]`` (float32, NaN where undefined).

    ``points[a, b]`` are the points of the pair {a, b}, drawn inside the overlap box of the two
    crops, in view a's frame normalised to [-1, 1] ((x, y) order, x negated when view a was
    flipped); ``points[b, a]`` are the same image locations in view b's frame. The frame is the
    crop box itself, so it is independent of the view's pixel size.
    """
    num_views = boxes.shape[0]
    lo = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])  # [V, V, 2] overlap top-left
    hi = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    if point_mode == "random":
        u = torch.rand(num_views, num_views, num_points, 2, generator=generator)
        upper = torch.ones(num_views, num_views, dtype=torch.bool).triu()[..., None, None]
        u = torch.where(upper, u, u.transpose(0, 1))  # same u on both sides of a pair
    elif point_mode == "grid":
        centres = (torch.arange(num_points, dtype=torch.float32) + 0.5) / num_points
        gy, gx = torch.meshgrid(centres, centres, indexing="ij")
        u = torch.stack([gx, gy], dim=-1).reshape(1, 1, -1, 2)
    else:
        raise ValueError(f"point_mode must be 'random' or 'grid', got {point_mode!r}")
    location = lo[:, :, None] + u * (hi - lo)[:, :, None]  # [V, V, K', 2] image pixels
    origin = boxes[:, None, None, :2]
    extent = (boxes[:, 2:] - boxes[:, :2])[:, None, None]
    points = (location - origin) / extent * 2 - 1
    sign = torch.ones(num_views, 1, 1, 2)
    sign[flips, ..., 0] = -1.0
    points = points * sign
    mask = pair_mask(num_views, num_teacher)
    return torch.where(mask[..., None, None], points, torch.full_like(points, float("nan")))


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


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


def _photometric(
    img: Tensor, draws: list[float], order: list[int], recipe: _Recipe, cfg: ViewConfig
) -> Tensor:
    """Jitter, grayscale, blur and solarize a float view in [0, 1] as DINO does.

    ``draws``: [jitter?, brightness, contrast, saturation, hue, grayscale?, blur?, sigma,
    solarize?] (9 values, each U[0, 1)).
    """
    if draws[0] < _JITTER_P:
        img = _color_jitter(img, draws[1:5], order, cfg.hue)
    if draws[5] < cfg.grayscale_p:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if draws[6] < recipe.blur_p:
        sigma = _SIGMA_RANGE[0] + (_SIGMA_RANGE[1] - _SIGMA_RANGE[0]) * draws[7]
        img = gaussian_blur(img, sigma)
    if draws[8] < recipe.solarize_p:
        img = TF.solarize(img, threshold=_SOLARIZE_THRESHOLD)
    return img


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
    :func:`normalize_views`.

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
        self._recipes = [
            _GLOBAL_1 if v == 0 else _GLOBAL_2 if v < cfg.num_global else _LOCAL
            for v in range(cfg.num_views)
        ]
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
            draws = torch.rand(num_views, 9, generator=generator).tolist()
            orders = torch.rand(num_views, 4, generator=generator).argsort(dim=1).tolist()
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
                view = _photometric(view, draws[v], orders[v], self._recipes[v], cfg)
            if self.dtype == "uint8":
                views.append(quantize(view))
            else:
                views.append(((view - self._mean) / self._std).contiguous())
        points = reference_points(
            boxes, flips, cfg.num_teacher, cfg.num_points, cfg.point_mode, generator
        )
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


def normalize_views(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with float32 normalised views in place of uint8 ones, computed where the views
    are (the train step calls it after moving the batch to the device).

    uint8 views need ``batch['pixel_norm']`` ([2, 3] or one per sample, [B, 2, 3]: mean; std),
    which is consumed. Float views pass through unchanged.
    """
    views = batch.get("views")
    if not views or views[0].dtype != torch.uint8:
        return batch
    if "pixel_norm" not in batch:
        raise ValueError(
            "uint8 views need batch['pixel_norm'] (mean and std, from "
            "MultiViewTransform(cfg, dtype='uint8'))"
        )
    if any(v.dtype != torch.uint8 for v in views):
        raise ValueError(f"views mix dtypes: {sorted({str(v.dtype) for v in views})}")
    batch = dict(batch)
    stats = batch.pop("pixel_norm")
    stats = (stats[0] if stats.ndim == 3 else stats).float()  # every sample has the same
    if stats.shape != (2, 3):
        raise ValueError(f"pixel_norm must be [2, 3] (mean; std), got {tuple(stats.shape)}")
    # (x / 255 - mean) / std as one multiply-add per pixel.
    scale = (1.0 / (255.0 * stats[1])).view(3, 1, 1)
    shift = (-stats[0] / stats[1]).view(3, 1, 1)
    batch["views"] = [torch.addcmul(shift, v.float(), scale) for v in views]
    return batch


def _stack_values(key: str, values: list[Any]) -> Any:
    """Stack tensors / numbers of one key into a tensor; other values stay a list."""
    if all(isinstance(v, Tensor) for v in values):
        try:
            return torch.stack(values)
        except RuntimeError as err:
            raise ValueError(f"cannot stack key {key!r}: {err}") from err
    if all(isinstance(v, bool | int | float) for v in values):
        return torch.tensor(values)
    return values


def collate_views(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples of :class:`MultiViewTransform` (plus extra keys such as ``label``).

    ``views`` becomes a list with one [B, 3, S_v, S_v] tensor per view index; every other key is
    stacked along a new batch dimension (tensors and numbers), or kept as a list otherwise.
    """
    if not samples:
        raise ValueError("collate_views needs at least one sample")
    keys = samples[0].keys()
    for i, sample in enumerate(samples):
        if sample.keys() != keys:
            raise ValueError(f"sample {i} has keys {sorted(sample)}, expected {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        if key == "views":
            num_views = len(samples[0]["views"])
            if any(len(s["views"]) != num_views for s in samples):
                raise ValueError("samples have different numbers of views")
            batch["views"] = [
                _stack_values(f"views[{v}]", [s["views"][v] for s in samples])
                for v in range(num_views)
            ]
        else:
            batch[key] = _stack_values(key, [s[key] for s in samples])
    return batch

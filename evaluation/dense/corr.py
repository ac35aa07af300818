"""Cross-view dense correspondence with known geometry (the property DenseDINO's loss trains).

Two augmented views of one image (random resized crops and mirrors recorded as the training
views record them, photometric jitter on) are embedded; every patch centre of view A that
lies inside view B is matched to the most cosine-similar patch of B. The error is the distance,
in view-B pixels, between the matched patch's centre and where the point truly lies in B.
Reported: PCK at 0.05 and 0.1 of the view side, the mean error in patches, over all points and
apart for object / background points (with masks), always beside the position-only matcher
(patch (i, j) of A -> patch (i, j) of B, reading no pixel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from densedino.evaluation.dense.data import Crop, normalise, random_crop

THRESHOLDS = (0.05, 0.1)
DEFAULT_SCALE = (0.4, 1.0)
PatchFn = Callable[[Tensor], Tensor]  # images [B, 3, S, S] -> unit features [B, h, w, D]


class ImageSource(Protocol):
    """What corr reads: images (and masks, or None) by index."""

    def __len__(self) -> int: ...
    def read(self, index: int) -> tuple[Image.Image, np.ndarray | None]: ...


# ---------------------------------------------------------------------------- geometry
def patch_centres(grid: int, size: int) -> Tensor:
    """Centres (x, y) [grid * grid, 2] of a grid x grid patch grid on a size-px view, row-major."""
    step = size / grid
    coords = (torch.arange(grid, dtype=torch.float64) + 0.5) * step
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def view_to_image(points: Tensor, crop: Crop) -> Tensor:
    """View pixel coordinates (x, y) -> source image coordinates."""
    x0, y0, x1, y1 = crop.box
    u = crop.size - points[:, 0] if crop.flip else points[:, 0]
    return torch.stack(
        [x0 + u * (x1 - x0) / crop.size, y0 + points[:, 1] * (y1 - y0) / crop.size], dim=1
    )


def image_to_view(points: Tensor, crop: Crop) -> Tensor:
    """Source image coordinates -> view pixel coordinates (x, y); the inverse of view_to_image."""
    x0, y0, x1, y1 = crop.box
    u = (points[:, 0] - x0) * crop.size / (x1 - x0)
    v = (points[:, 1] - y0) * crop.size / (y1 - y0)
    return torch.stack([crop.size - u if crop.flip else u, v], dim=1)


@dataclass
class PairPoints:
    """The correspondences of one pair: A patches inside B, their true B position, matches."""

    a_index: Tensor  # [m] patch index in A
    truth_b: Tensor  # [m, 2] true position in B (px)
    truth_image: Tensor  # [m, 2] position in the source image (px)
    matched: Tensor  # [m] matched patch index in B (features)
    grid: int  # patches per side


def match_pair(feat_a: Tensor, feat_b: Tensor, crop_a: Crop, crop_b: Crop) -> PairPoints:
    """Match the patches of view A that lie in view B (features [h, w, D], unit rows)."""
    grid = feat_a.shape[0]
    if feat_a.shape != feat_b.shape or feat_a.shape[0] != feat_a.shape[1]:
        raise ValueError("both views need the same square patch grid")
    centres = patch_centres(grid, crop_a.size)
    in_image = view_to_image(centres, crop_a)
    in_b = image_to_view(in_image, crop_b)
    inside = ((in_b >= 0) & (in_b < crop_b.size)).all(dim=1)
    a_index = inside.nonzero().squeeze(1)
    sims = (
        feat_a.reshape(grid * grid, -1)[a_index].float() @ feat_b.reshape(grid * grid, -1).float().T
    )
    return PairPoints(a_index, in_b[inside], in_image[inside], sims.argmax(dim=1), grid)


def errors_px(matched: Tensor, truth_b: Tensor, grid: int, size: int) -> Tensor:
    """Distance (view-B px) between matched patch centres and the true positions."""
    return (patch_centres(grid, size)[matched] - truth_b).norm(dim=1)


# ---------------------------------------------------------------------------- summary
@dataclass
class CorrAccumulator:
    """Errors (view px) of every point, for the feature and the position-only matchers."""

    size: int
    grid: int
    feature_err: list[Tensor] = field(default_factory=list)
    position_err: list[Tensor] = field(default_factory=list)
    region: list[Tensor] = field(default_factory=list)  # 1 object, 0 background, -1 unknown
    pairs: int = 0
    empty_pairs: int = 0

    def add(self, points: PairPoints, mask: np.ndarray | None) -> None:
        self.pairs += 1
        if not len(points.a_index):
            self.empty_pairs += 1
            return
        self.feature_err.append(errors_px(points.matched, points.truth_b, self.grid, self.size))
        self.position_err.append(errors_px(points.a_index, points.truth_b, self.grid, self.size))
        if mask is None:
            region = torch.full((len(points.a_index),), -1)
        else:
            xy = points.truth_image.floor().long()
            xs = xy[:, 0].clamp(0, mask.shape[1] - 1)
            ys = xy[:, 1].clamp(0, mask.shape[0] - 1)
            values = torch.from_numpy(mask.astype(np.int64))[ys, xs]
            region = torch.where(values == 255, -1, (values > 0).long())
        self.region.append(region)

    def summary(self) -> dict[str, Any]:
        """{matcher: {subset: {pck@0.05, pck@0.1, err_patches, points}}} (percent for PCK)."""
        if not self.feature_err:
            raise ValueError("no pair of views overlapped: nothing to score")
        region = torch.cat(self.region)
        subsets = {"all": torch.ones_like(region, dtype=torch.bool)}
        if (region >= 0).any():
            subsets.update(object=region == 1, background=region == 0)
        patch_px = self.size / self.grid
        out: dict[str, Any] = {}
        for name, errs in (("features", self.feature_err), ("position", self.position_err)):
            err = torch.cat(errs)
            out[name] = {
                subset: _scores(err[keep], self.size, patch_px) for subset, keep in subsets.items()
            }
        out["pairs"] = self.pairs
        out["pairs_without_overlap"] = self.empty_pairs
        return out


def _scores(err: Tensor, size: int, patch_px: float) -> dict[str, float]:
    if not len(err):
        return {"points": 0}
    scores = {f"pck@{t}": float(100 * (err <= t * size).double().mean()) for t in THRESHOLDS}
    scores["err_patches"] = float(err.double().mean() / patch_px)
    scores["points"] = len(err)
    return scores


# ---------------------------------------------------------------------------- views
def jitter(image: Image.Image, generator: torch.Generator, strength: float = 0.4) -> Image.Image:
    """Colour jitter (brightness, contrast, saturation +-strength, hue +-strength / 4)."""
    draws = torch.rand(4, generator=generator).tolist()
    order = torch.randperm(4, generator=generator).tolist()
    ops = [
        lambda im: TF.adjust_brightness(im, 1 + strength * (2 * draws[0] - 1)),
        lambda im: TF.adjust_contrast(im, 1 + strength * (2 * draws[1] - 1)),
        lambda im: TF.adjust_saturation(im, 1 + strength * (2 * draws[2] - 1)),
        lambda im: TF.adjust_hue(im, strength / 4 * (2 * draws[3] - 1)),
    ]
    for i in order:
        image = ops[i](image)
    return image


def make_pair(
    image: Image.Image,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    photometric: bool = True,
) -> tuple[tuple[Tensor, Crop], tuple[Tensor, Crop]]:
    """Two augmented views (normalised tensors) of `image` and their crops."""
    views = []
    for _ in range(2):
        crop = random_crop(image.height, image.width, size, scale, generator)
        view, _ = crop.apply(image, None)
        if photometric:
            view = jitter(view, generator)
        views.append((normalise(view), crop))
    return views[0], views[1]


@dataclass
class CorrResult:
    summary: dict[str, Any]
    examples: list[tuple[Tensor, Tensor, Crop, Crop, PairPoints]] = field(default_factory=list)


def evaluate(
    patch_fn: PatchFn,
    images: ImageSource,
    size: int,
    *,
    batch_size: int = 32,
    scale: tuple[float, float] = DEFAULT_SCALE,
    photometric: bool = True,
    seed: int = 0,
    keep_examples: int = 0,
    progress: bool = False,
) -> CorrResult:
    """Correspondence scores over one pair of views per image (the pairs depend only on seed)."""
    generator = torch.Generator().manual_seed(seed)
    acc: CorrAccumulator | None = None
    examples: list[tuple[Tensor, Tensor, Crop, Crop, PairPoints]] = []
    indices: Iterable[int] = range(0, len(images), batch_size)
    for start in tqdm(indices, desc="corr", disable=not progress):
        pairs, masks = [], []
        for i in range(start, min(start + batch_size, len(images))):
            image, mask = images.read(i)
            pairs.append(make_pair(image, size, generator, scale, photometric))
            masks.append(mask)
        batch = torch.stack([v for pair in pairs for v, _ in pair])
        feats = patch_fn(batch)  # [2B, h, w, D]
        if acc is None:
            acc = CorrAccumulator(size, feats.shape[1])
        for j, ((view_a, crop_a), (view_b, crop_b)) in enumerate(pairs):
            points = match_pair(feats[2 * j], feats[2 * j + 1], crop_a, crop_b)
            acc.add(points, masks[j])
            if len(examples) < keep_examples and len(points.a_index):
                examples.append((view_a, view_b, crop_a, crop_b, points))
    if acc is None:
        raise ValueError("no image to evaluate")
    return CorrResult(acc.summary(), examples)

"""Images and masks of a Pascal VOC layout folder, and the paired crops the dense protocols use.

Classes and splits are those of the seg probe (:mod:`densedino.evaluation.seg.dataset`): the
built-in data is recognised by the ``meta.json`` that ``densedino-data`` writes above
``VOCdevkit/VOC2012`` (background + its shapes), any other folder is Pascal VOC's 21 classes;
the memory/train split is ``trainaug`` when present, else ``train``; the test split is ``val``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from densedino.data.crops import sample_crop_boxes
from densedino.data.eval_transform import image_to_tensor

IGNORE_INDEX = 255


@dataclass(frozen=True)
class SegImages:
    """One split of a VOC-layout folder: ``JPEGImages/<id>.jpg`` + ``<labels>/<id>.png``."""

    root: Path
    ids: tuple[str, ...]
    label_dir: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, mask [H, W] uint8 with 255 = ignore)."""
        image_id = self.ids[index]
        with Image.open(self.root / "JPEGImages" / f"{image_id}.jpg") as image:
            rgb = image.convert("RGB")
        with Image.open(self.root / self.label_dir / f"{image_id}.png") as labels:
            mask = np.asarray(labels.convert("P") if labels.mode == "P" else labels)
        if mask.ndim != 2 or mask.shape != (rgb.height, rgb.width):
            raise ValueError(f"{image_id}: mask {mask.shape} does not match image {rgb.size}")
        return rgb, mask.astype(np.uint8)

    def subset(self, count: int | None) -> SegImages:
        """The first `count` images (all when None)."""
        if count is None or count >= len(self.ids):
            return self
        return SegImages(self.root, self.ids[:count], self.label_dir, self.classes, self.palette)


def voc_split(voc_root: Path, split: str, classes: str | None = "auto") -> SegImages:
    """The ``train`` (trainaug if present) or ``val`` split of a VOC-layout folder."""
    from densedino.evaluation.seg.dataset import read_ids, resolve_classes, resolve_splits

    splits = resolve_splits(voc_root)
    info = resolve_classes(voc_root, classes)
    if split == "train":
        ids, labels = read_ids(voc_root, splits.train_list), splits.train_labels
    elif split == "val":
        ids, labels = read_ids(voc_root, splits.val_list), splits.val_labels
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not ids:
        raise ValueError(f"{voc_root}: the {split} list is empty")
    return SegImages(voc_root, tuple(ids), labels, info.names, info.palette)


def normalise(image: Image.Image) -> Tensor:
    """[3, H, W] float, ImageNet-normalised."""
    return image_to_tensor(image)


@dataclass(frozen=True)
class Crop:
    """A crop box (x0, y0, x1, y1) in source pixels, mirrored or not, resized to size x size."""

    box: tuple[float, float, float, float]
    flip: bool
    size: int

    def apply(
        self, image: Image.Image, mask: np.ndarray | None
    ) -> tuple[Image.Image, Tensor | None]:
        """The view's image (bilinear) and mask (nearest), as torchvision's paired crops."""
        box = tuple(round(v) for v in self.box)
        out = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        labels = None
        if mask is not None:
            crop = Image.fromarray(mask).resize((self.size, self.size), Image.NEAREST, box=box)
            labels = torch.from_numpy(np.asarray(crop, dtype=np.int64).copy())
        if self.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
            labels = None if labels is None else labels.flip(-1)
        return out, labels


def random_crop(
    height: int,
    width: int,
    size: int,
    scale: tuple[float, float],
    generator: torch.Generator,
    flip: bool = True,
) -> Crop:
    """A RandomResizedCrop box (densedino.data.crops' sampler) and a coin-flip mirror."""
    box = sample_crop_boxes(1, height, width, scale, (3 / 4, 4 / 3), generator)[0].tolist()
    mirrored = flip and bool(torch.rand((), generator=generator) < 0.5)
    return Crop((box[0], box[1], box[2], box[3]), mirrored, size)


def full_crop(height: int, width: int, size: int) -> Crop:
    """The whole image resized to size x size (the test transform)."""
    return Crop((0.0, 0.0, float(width), float(height)), False, size)


def seg_batches(
    images: SegImages,
    size: int,
    batch_size: int,
    *,
    augment: bool = False,
    scale: tuple[float, float] = (0.25, 1.0),
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor, Sequence[int]]]:
    """Yield (images [B, 3, S, S], masks [B, S, S] int64, dataset indices).

    ``augment``: random resized crops + flips (the memory bank's passes), else the image
    resized whole.
    """
    if augment and generator is None:
        raise ValueError("augmented batches need a generator")
    for start in range(0, len(images), batch_size):
        rows = range(start, min(start + batch_size, len(images)))
        views, masks = [], []
        for i in rows:
            image, mask = images.read(i)
            crop = (
                random_crop(image.height, image.width, size, scale, generator)  # type: ignore[arg-type]
                if augment
                else full_crop(image.height, image.width, size)
            )
            view, labels = crop.apply(image, mask)
            views.append(normalise(view))
            masks.append(labels)
        yield torch.stack(views), torch.stack(masks), rows

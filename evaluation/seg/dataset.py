"""Pascal VOC layout: class list, splits, the dataset class and the probe's own transforms."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.datasets import BaseSegDataset, PascalVOCDataset
from mmseg.registry import DATASETS, TRANSFORMS

from densedino.data.constants import voc_palette

VOC_CLASSES: tuple[str, ...] = tuple(PascalVOCDataset.METAINFO["classes"])
SPLIT_DIR = Path("ImageSets") / "Segmentation"


@DATASETS.register_module()
class VOCLayoutDataset(BaseSegDataset):
    """A Pascal VOC folder whose classes are not VOC's 21 (e.g. the built-in data).

    mmseg's ``PascalVOCDataset`` only accepts subsets of the VOC classes in its metainfo, so a
    dataset with other classes passes ``metainfo=dict(classes=..., palette=...)`` here instead;
    everything else (files, split list, annotations) is read the same way.
    """

    METAINFO: ClassVar[dict] = {}

    def __init__(self, ann_file: str, **kwargs) -> None:
        kwargs.setdefault("img_suffix", ".jpg")
        kwargs.setdefault("seg_map_suffix", ".png")
        super().__init__(ann_file=ann_file, **kwargs)


@dataclass(frozen=True)
class ClassInfo:
    """The label set of a dataset: index i of a mask means ``names[i]``."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    source: str  # where the names came from: 'voc', 'meta.json: PATH' or '--classes'

    @property
    def is_voc(self) -> bool:
        return self.names == VOC_CLASSES


@dataclass(frozen=True)
class VOCSplits:
    """What the probe trains and tests on inside a VOC2012 folder."""

    root: Path
    train_list: str  # ann_file relative to root
    train_labels: str  # label folder relative to root
    val_list: str
    val_labels: str

    @property
    def train_split(self) -> str:
        return Path(self.train_list).stem


def _palette(names: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    return tuple(voc_palette(len(names)))


def find_demo_meta(voc_root: Path) -> Path | None:
    """The built-in dataset's ``meta.json`` that describes ``voc_root``, if any.

    ``densedino-data ROOT`` writes ``ROOT/meta.json`` with ``voc_root: VOCdevkit/VOC2012``; a
    meta.json anywhere above ``voc_root`` counts only if its ``voc_root`` points back at it.
    """
    voc_root = voc_root.resolve()
    for parent in voc_root.parents:
        meta = parent / "meta.json"
        if not meta.is_file():
            continue
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and "voc_root" in info and "classes" in info:
            if (parent / info["voc_root"]).resolve() == voc_root:
                return meta
    return None


def resolve_classes(voc_root: Path, classes: str | None = None) -> ClassInfo:
    """The classes of a VOC folder.

    ``classes``: None or 'auto' = the built-in dataset's (background + the shapes of its
    meta.json) when ``voc_root`` is one, else VOC's 21; 'voc' = VOC's 21; otherwise a
    comma-separated list of names in mask-index order (index 0 first, usually 'background').
    """
    if classes == "voc":
        return ClassInfo(VOC_CLASSES, _palette(VOC_CLASSES), "voc")
    if classes not in (None, "auto"):
        names = tuple(n.strip() for n in classes.split(","))
        if len(names) < 2 or any(not n for n in names) or len(set(names)) != len(names):
            raise ValueError(
                f"--classes needs at least 2 distinct non-empty comma-separated names, "
                f"got {classes!r}"
            )
        if len(names) > 255:
            raise ValueError("at most 255 classes: label 255 means 'ignore'")
        return ClassInfo(names, _palette(names), "--classes")
    meta_path = find_demo_meta(voc_root)
    if meta_path is None:
        return ClassInfo(VOC_CLASSES, _palette(VOC_CLASSES), "voc")
    meta = json.loads(meta_path.read_text())
    names = ("background", *meta["classes"])
    palette = tuple(tuple(int(c) for c in colour) for colour in meta.get("palette", []))
    if len(palette) != len(names):
        palette = _palette(names)
    return ClassInfo(names, palette, f"meta.json: {meta_path}")


def resolve_splits(voc_root: Path) -> VOCSplits:
    """trainaug (SegmentationClassAug labels) when both it and its list exist, else train;
    val with SegmentationClass. Raises FileNotFoundError naming what is missing."""
    if not voc_root.is_dir():
        raise FileNotFoundError(f"--data {voc_root} is not a directory (expected VOC2012/)")
    required = [
        voc_root / "JPEGImages",
        voc_root / "SegmentationClass",
        voc_root / SPLIT_DIR / "val.txt",
    ]
    missing = [str(p.relative_to(voc_root)) for p in required if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{voc_root} is not a Pascal VOC 2012 folder: missing {', '.join(missing)} "
            "(expected JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{train,val}.txt)"
        )
    aug_list = SPLIT_DIR / "trainaug.txt"
    if (voc_root / "SegmentationClassAug").is_dir() and (voc_root / aug_list).is_file():
        train_list, train_labels = aug_list, "SegmentationClassAug"
    elif (voc_root / SPLIT_DIR / "train.txt").is_file():
        train_list, train_labels = SPLIT_DIR / "train.txt", "SegmentationClass"
    else:
        raise FileNotFoundError(f"{voc_root} has neither {aug_list} nor {SPLIT_DIR}/train.txt")
    return VOCSplits(
        voc_root, str(train_list), train_labels, str(SPLIT_DIR / "val.txt"), "SegmentationClass"
    )


def read_ids(voc_root: Path, list_file: str) -> list[str]:
    """The image ids of a split list."""
    return (voc_root / list_file).read_text().split()


# ------------------------------------------------------------------------------- transforms
@TRANSFORMS.register_module()
class PairedRandomResizedCrop(BaseTransform):
    """torchvision's RandomResizedCrop applied to the image and its label map together.

    The crop box is drawn as torchvision draws it (area fraction in ``scale``, log-uniform
    aspect ratio in ``ratio``, 10 tries, then a centre crop clamped to ``ratio``); the image is
    resized bilinearly and the labels by nearest neighbour to ``size``, with Pillow (Leopart's
    paired transform on PIL images).
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be a positive int or (height, width), got {size}")
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"bad scale {scale} or ratio {ratio}")
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop (torchvision's ``RandomResizedCrop.get_params``)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * np.random.uniform(*self.scale)
            aspect = math.exp(np.random.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = np.random.randint(0, height - h + 1)
                return top, np.random.randint(0, width - w + 1), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def transform(self, results: dict) -> dict:
        top, left, h, w = self.crop_box(*results["img"].shape[:2])
        out_h, out_w = self.size
        # Pillow, as torchvision on PIL images (Leopart): its nearest samples pixel centres,
        # like bilinear, where cv2's nearest is shifted by up to half a source pixel.
        image = results["img"][top : top + h, left : left + w]
        results["img"] = mmcv.imresize(
            image, (out_w, out_h), interpolation="bilinear", backend="pillow"
        )
        for key in results.get("seg_fields", []):
            labels = results[key][top : top + h, left : left + w]
            results[key] = mmcv.imresize(
                labels, (out_w, out_h), interpolation="nearest", backend="pillow"
            )
        results["img_shape"] = (out_h, out_w)
        return results

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


@TRANSFORMS.register_module()
class ScoreAtInputSize(BaseTransform):
    """Make the resized image the reference size: predictions are produced and scored there.

    mmseg resizes the logits to ``ori_shape`` and compares them with the label map as loaded.
    Leopart instead resizes image and labels (nearest) to 448 x 448 and scores at 448; placed
    after a ``Resize`` that also resized the labels, this sets ``ori_shape`` to the new size.
    """

    def transform(self, results: dict) -> dict:
        results["ori_shape"] = results["img"].shape[:2]
        return results

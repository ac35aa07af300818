"""Training data: image folders or file lists -> multi-view samples, robust to bad files.

Randomness of a sample depends only on (seed, epoch, index), so a resumed run, a run on more
processes and an uninterrupted run see the same views of the same image.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import PIL.Image
import torch
from mmengine.dataset import DefaultSampler
from mmengine.registry import DATA_SAMPLERS, DATASETS, FUNCTIONS
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import pil_to_tensor

from densedino.data.collate import collate_views
from densedino.data.view_config import ViewConfig
from densedino.data.views import MultiViewTransform

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
# Bad files met before giving up on a sample: only reached by a dataset that is mostly broken.
MAX_SKIPS = 100


def list_images(root: str | Path, ann_file: str | Path | None = None) -> list[Path]:
    """Images under ``root`` (recursive, sorted) or the paths listed in ``ann_file`` (one per
    line, relative to ``root``; anything after whitespace, e.g. a class index, is ignored)."""
    root = Path(root)
    if ann_file is not None:
        lines = Path(ann_file).read_text().splitlines()
        files = [root / line.split()[0] for line in lines if line.strip()]
    else:
        if not root.is_dir():
            raise FileNotFoundError(f"training data folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(
            f"no images found in {ann_file or root} (suffixes {sorted(IMAGE_SUFFIXES)})"
        )
    return files


def load_rgb(path: Path) -> Tensor:
    """Decode an image file to uint8 [3, H, W]; torchvision first, PIL for other formats."""
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError:
        with PIL.Image.open(path) as img:
            return pil_to_tensor(img.convert("RGB"))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed; distinct for distinct (epoch, index) for any dataset < 2**24 images."""
    return (seed * 1_000_003 + epoch) * (1 << 24) + index


@DATASETS.register_module()
class SSLImageDataset(Dataset):
    """Unlabelled images turned into DINO/DenseDINO views.

    Args:
        root: folder of images (ImageNet's ``train/<class>/*.JPEG`` or any tree), or the base of
            the paths in ``ann_file``.
        ann_file: optional file list.
        views: ``ViewConfig`` fields, or ``{"preset": "dino"|"paper"|"authors", **overrides}``.
        seed: base of the per-sample seeds.
        uint8_views: give uint8 views (normalised on the device by the train step, a quarter of
            the bytes to move); False gives normalised float32 views.

    Indexed by ``(epoch, index)`` (see :class:`EpochSampler`) or a plain index (epoch 0).
    A file that cannot be decoded is logged, counted in ``sample['corrupt']`` and replaced by
    the next file, so one bad JPEG never stops a run.
    """

    def __init__(
        self,
        root: str,
        ann_file: str | None = None,
        views: dict | None = None,
        seed: int = 0,
        uint8_views: bool = True,
    ) -> None:
        self.files = list_images(root, ann_file)
        self.view_config = build_view_config(views or {})
        dtype = "uint8" if uint8_views else "float32"
        self.transform = MultiViewTransform(self.view_config, dtype=dtype)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        for skipped in range(min(MAX_SKIPS, len(self.files))):
            path = self.files[(index + skipped) % len(self.files)]
            try:
                image = load_rgb(path)
            except (OSError, RuntimeError, ValueError, PIL.Image.DecompressionBombError) as err:
                logger.warning("skipping unreadable image %s: %s", path, err)
                continue
            sample = self.transform(image, generator=generator)
            sample["index"] = index
            sample["corrupt"] = skipped
            return sample
        raise RuntimeError(f"{MAX_SKIPS} unreadable images in a row from {self.files[index]}")


def build_view_config(spec: dict) -> ViewConfig:
    """``ViewConfig`` from a config dict, optionally starting from a named preset."""
    spec = dict(spec)
    preset = spec.pop("preset", None)
    if preset is None:
        return ViewConfig(**spec)
    presets = {"dino": ViewConfig.dino, "paper": ViewConfig.paper, "authors": ViewConfig.authors}
    if preset not in presets:
        raise ValueError(f"unknown view preset {preset!r}; choose from {sorted(presets)}")
    return dataclasses.replace(presets[preset](), **spec)


@DATA_SAMPLERS.register_module()
class EpochSampler(DefaultSampler):
    """mmengine's ``DefaultSampler`` that yields ``(epoch, index)`` keys and can skip the start
    of an epoch, so that a run resumed mid-epoch continues with exactly the next batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0

    def skip_next(self, num_samples: int) -> None:
        """Leave out the first ``num_samples`` samples (of this rank) at the next ``__iter__``."""
        self._skip = num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self._skip :]
        self._skip = 0
        return iter([(self.epoch, i) for i in indices])


@FUNCTIONS.register_module()
def ssl_collate(samples: list[dict]) -> dict:
    """Batch multi-view samples; ``corrupt`` becomes the number of files skipped for the batch."""
    corrupt = sum(int(s.pop("corrupt")) for s in samples)
    batch = collate_views(samples)
    batch["corrupt"] = torch.tensor(corrupt)
    return batch

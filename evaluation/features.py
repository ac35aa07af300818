"""Frozen-backbone feature extraction for evaluation: image folders, cache, rank sharding.

- :func:`scan_image_folder` lists an ImageNet-style split (``split/<class>/**/*.jpg``).
- :class:`ImageFileDataset` loads and transforms images; an unreadable or corrupt file is
  reported (never raised), and :func:`extract_features` skips, logs and counts it.
- :func:`extract_features` writes L2-normalised CLS features to a cache entry (memory-mapped
  ``.npy``, float32 or float16) keyed by the checkpoint and the split's file list, and reuses it
  on the next run. Under ``torchrun`` (``torch.distributed`` initialised) each rank extracts a
  contiguous slice into a shard file and rank 0 concatenates the shards; ranks therefore need a
  shared cache directory (one node, or a shared file system).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from densedino.data.constants import IMAGENET_MEAN, IMAGENET_STD
from densedino.data.eval_transform import (  # noqa: F401 (re-exported)
    DINO_CROP,
    DINO_RESIZE,
    eval_transform,
    resize_for_crop,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 1  # bump when the extraction changes, so old cache entries are not reused
# What a corrupt, truncated or hostile image file raises while PIL decodes it.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_HASH_BLOCK = 1 << 20
_LOGGED_SKIPS = 10  # skipped files logged one by one; the rest only counted


# ---------------------------------------------------------------------------------- folders
@dataclass(frozen=True)
class ImageList:
    """The images of one split: paths relative to `root`, integer labels, class names."""

    root: Path
    files: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    sizes: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """sha256 of the classes and the (relative path, label, byte size) of every file."""
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        sizes = self.sizes or (-1,) * len(self.files)  # a hand-made list may omit them
        for name, label, size in zip(self.files, self.labels.tolist(), sizes, strict=True):
            digest.update(f"\n{name}\t{label}\t{size}".encode())
        return digest.hexdigest()


def scan_image_folder(
    root: str | os.PathLike[str], classes: Sequence[str] | None = None
) -> ImageList:
    """List ``root/<class>/**/<image>``, classes and files sorted (torchvision's order).

    With `classes` (e.g. the training split's), labels index that list and a class folder
    outside it is an error; classes may be missing from this split.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no split directory at {root}")
    found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not found:
        raise ValueError(f"{root} has no class sub-directories (expected {root}/<class>/*.jpg)")
    names = tuple(found) if classes is None else tuple(classes)
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{root} has classes that the training split lacks: {unknown[:10]}")
    label_of = {name: i for i, name in enumerate(names)}
    files, labels, sizes = [], [], []
    for name in found:
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    path = Path(dirpath) / filename
                    files.append(path.relative_to(root).as_posix())
                    labels.append(label_of[name])
                    sizes.append(path.stat().st_size)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return ImageList(root, tuple(files), np.asarray(labels, dtype=np.int64), names, tuple(sizes))


@dataclass(frozen=True)
class Sample:
    """One dataset item: the image tensor, or None and the reason it could not be read."""

    index: int
    label: int
    image: torch.Tensor | None
    error: str | None = None


class ImageFileDataset(Dataset[Sample]):
    """The images of an :class:`ImageList`; a file PIL cannot read yields ``image=None``."""

    def __init__(self, images: ImageList, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        label = int(self.images.labels[index])
        try:
            with Image.open(self.images.root / self.images.files[index]) as image:
                rgb = image.convert("RGB")  # decodes fully: truncation surfaces here
            return Sample(index, label, self.transform(rgb))
        except IMAGE_ERRORS as error:
            return Sample(index, label, None, f"{type(error).__name__}: {error}")


@dataclass
class Batch:
    """Readable images stacked, with their dataset indices and labels, and the failures."""

    images: torch.Tensor | None
    indices: np.ndarray
    labels: np.ndarray
    failures: list[tuple[int, str]] = field(default_factory=list)


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """Stack the readable samples; keep (index, error) of the others."""
    good = [s for s in samples if s.image is not None]
    return Batch(
        images=torch.stack([s.image for s in good]) if good else None,  # type: ignore[misc]
        indices=np.asarray([s.index for s in good], dtype=np.int64),
        labels=np.asarray([s.label for s in good], dtype=np.int64),
        failures=[(s.index, s.error or "unreadable") for s in samples if s.image is None],
    )


# ------------------------------------------------------------------------------ extraction
@torch.inference_mode()
def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 features [B, D] of `model(images)` (the CLS token for our ViT)."""
    features = model(images)
    if features.ndim != 2:
        raise ValueError(f"the model must return [B, D] features, got {tuple(features.shape)}")
    return F.normalize(features.float(), dim=1)


def iter_features(
    model: nn.Module,
    dataset: Dataset[Sample],
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool = False,
    desc: str = "features",
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Yield each batch with its features [n, D] (float32, L2-normalised) on the CPU."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=device.type == "cuda",
    )
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        if batch.images is None:
            yield batch, np.zeros((0, 0), dtype=np.float32)
            continue
        images = batch.images.to(device, non_blocking=True)
        yield batch, embed(model, images).cpu().numpy()


# ---------------------------------------------------------------------------------- cache
def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (identifies a checkpoint wherever it is copied)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def cache_key(model_id: str, images: ImageList, settings: Mapping[str, Any]) -> str:
    """Key of a cache entry: the model, the split's file list and the extraction settings."""
    payload = {
        "version": CACHE_VERSION,
        "model": model_id,
        "data": images.fingerprint(),
        "settings": dict(settings),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class FeatureSet:
    """Features of the readable images of a split, in file-list order (memory-mapped).

    ``indices`` are the rows' positions in the split's file list; ``skipped`` lists
    (relative path, error) of the files that could not be read.
    """

    features: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    classes: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    path: Path
    from_cache: bool

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_feature_set(path: Path, from_cache: bool = True) -> FeatureSet:
    """Open a finished cache entry (features memory-mapped read-only)."""
    meta = json.loads((path / "meta.json").read_text())
    return FeatureSet(
        features=np.load(path / "features.npy", mmap_mode="r"),
        labels=np.load(path / "labels.npy"),
        indices=np.load(path / "indices.npy"),
        classes=tuple(meta["classes"]),
        skipped=tuple((f, e) for f, e in meta["skipped"]),
        path=path,
        from_cache=from_cache,
    )


@dataclass(frozen=True)
class DistContext:
    """This process' rank among `world_size`, and a barrier across them."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None

    @classmethod
    def current(cls) -> DistContext:
        """The torch.distributed group if initialised (torchrun), else a single process."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(
                torch.distributed.get_rank(),
                torch.distributed.get_world_size(),
                torch.distributed.barrier,
            )
        return cls()


def shard_indices(count: int, rank: int, world_size: int) -> np.ndarray:
    """The contiguous slice of range(count) that `rank` extracts (sizes differ by <= 1)."""
    return np.array_split(np.arange(count), world_size)[rank]


def _shard_paths(part: Path, rank: int) -> tuple[Path, Path]:
    """(features .npy, index .npz) of a rank's shard; the .npz is written last."""
    return part / f"shard-{rank:05d}.features.npy", part / f"shard-{rank:05d}.npz"


def _write_shard(
    model: nn.Module,
    images: ImageList,
    part: Path,
    dist: DistContext,
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    dtype: np.dtype,
    progress: bool,
    desc: str,
) -> None:
    """Extract this rank's slice into its shard files (features streamed to a memory map)."""
    rows = shard_indices(len(images), dist.rank, dist.world_size)
    dataset = Subset(ImageFileDataset(images, transform), rows.tolist())
    features_path, index_path = _shard_paths(part, dist.rank)
    out: np.ndarray | None = None
    count = 0
    indices: list[np.ndarray] = []
    failures: list[tuple[int, str]] = []
    for batch, feats in iter_features(
        model,
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress and dist.rank == 0,
        desc=desc,
    ):
        failures.extend(batch.failures)
        if not len(batch.indices):
            continue
        if out is None:  # the feature dimension is known from the first batch on
            out = np.lib.format.open_memmap(
                features_path, mode="w+", dtype=dtype, shape=(len(rows), feats.shape[1])
            )
        out[count : count + len(feats)] = feats
        count += len(feats)
        indices.append(batch.indices)
    if out is not None:
        out.flush()
    tmp = index_path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        count=count,
        indices=np.concatenate(indices) if indices else np.zeros(0, np.int64),
        failed=np.asarray([i for i, _ in failures], dtype=np.int64),
        errors=np.asarray([e for _, e in failures], dtype=str),
        world_size=dist.world_size,
    )
    os.replace(tmp, index_path)  # marks the shard complete


def _gather_shards(
    part: Path, images: ImageList, world_size: int, dtype: np.dtype, chunk_rows: int = 65536
) -> list[tuple[str, str]]:
    """Concatenate the shards into features/labels/indices.npy; return the skipped files."""
    shards = []
    for rank in range(world_size):
        features_path, index_path = _shard_paths(part, rank)
        shard = dict(np.load(index_path))
        if int(shard["world_size"]) != world_size:
            raise RuntimeError(f"stale shard {rank} in {part} (from another world size)")
        count = int(shard["count"])
        shard["features"] = np.load(features_path, mmap_mode="r")[:count] if count else None
        shards.append(shard)
    dims = {s["features"].shape[1] for s in shards if s["features"] is not None}
    if len(dims) != 1:
        if not dims:
            raise ValueError(f"no readable image in {images.root}")
        raise RuntimeError(f"ranks disagree on the feature dimension: {sorted(dims)}")
    total = sum(int(s["count"]) for s in shards)
    out = np.lib.format.open_memmap(
        part / "features.npy", mode="w+", dtype=dtype, shape=(total, dims.pop())
    )
    row, skipped = 0, []
    for shard in shards:  # rank order = file-list order: the slices are contiguous
        for start in range(0, int(shard["count"]), chunk_rows):
            block = shard["features"][start : start + chunk_rows]
            out[row : row + len(block)] = block
            row += len(block)
        skipped += [
            (images.files[i], str(e))
            for i, e in zip(shard["failed"].tolist(), shard["errors"], strict=True)
        ]
    out.flush()
    del out, shards
    all_indices = np.concatenate(
        [np.load(_shard_paths(part, r)[1])["indices"] for r in range(world_size)]
    )
    np.save(part / "indices.npy", all_indices)
    np.save(part / "labels.npy", images.labels[all_indices])
    for rank in range(world_size):
        for path in _shard_paths(part, rank):
            path.unlink(missing_ok=True)
    return skipped


def _log_skipped(skipped: Sequence[tuple[str, str]], root: Path) -> None:
    for name, error in skipped[:_LOGGED_SKIPS]:
        log.warning("skipped unreadable image %s: %s", root / name, error)
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s", len(skipped), root)


def extract_features(
    model_factory: Callable[[], nn.Module] | nn.Module,
    images: ImageList,
    cache_dir: str | os.PathLike[str],
    model_id: str,
    *,
    resize: int = DINO_RESIZE,
    crop: int = DINO_CROP,
    batch_size: int = 64,
    num_workers: int = 4,
    device: torch.device | str = "cpu",
    fp16: bool = False,
    recompute: bool = False,
    progress: bool = False,
    name: str = "split",
    dist: DistContext | None = None,
) -> FeatureSet | None:
    """Features of `images` from the cache, or extracted (sharded over ranks) and cached.

    `model_factory` builds the model in eval mode (called only on a cache miss) or is the
    model. `model_id` identifies the weights in the cache key (e.g. :func:`file_fingerprint`).
    Returns the :class:`FeatureSet` on rank 0 and None on the other ranks.
    """
    dist = dist or DistContext.current()
    dtype = np.dtype(np.float16 if fp16 else np.float32)
    settings = {
        "resize": resize,
        "crop": crop,
        "dtype": dtype.name,
        "feature": "cls",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    key = cache_key(model_id, images, settings)
    entry = Path(cache_dir) / f"{name}-{key[:16]}"
    if (entry / "meta.json").is_file() and not recompute:
        log.info("%s: features from cache %s", name, entry)
        return load_feature_set(entry) if dist.rank == 0 else None

    start = time.perf_counter()
    part = entry.with_name(entry.name + ".partial")
    part.mkdir(parents=True, exist_ok=True)
    model = model_factory if isinstance(model_factory, nn.Module) else model_factory()
    model = model.to(device).eval()
    _write_shard(
        model,
        images,
        part,
        dist,
        transform=eval_transform(resize, crop),
        batch_size=batch_size,
        num_workers=num_workers,
        device=torch.device(device),
        dtype=dtype,
        progress=progress,
        desc=f"{name} features",
    )
    dist.barrier()  # every shard is written
    if dist.rank != 0:
        return None
    skipped = _gather_shards(part, images, dist.world_size, dtype)
    _log_skipped(skipped, images.root)
    meta = {
        "key": key,
        "model": model_id,
        "root": str(images.root),
        "files": len(images),
        "classes": list(images.classes),
        "skipped": skipped,
        "settings": settings,
        "world_size": dist.world_size,
        "seconds": time.perf_counter() - start,
    }
    (part / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: entry complete
    if entry.exists():
        shutil.rmtree(entry)
    os.replace(part, entry)
    return load_feature_set(entry, from_cache=False)

"""Write the procedural scenes of `synthetic` to disk in the ImageNet and Pascal VOC layouts.

Both layouts hold the *same* scenes (same ids, same JPEG bytes):

    root/imagenet/{train,val}/<class>/<id>.jpg         folder = image-level label
    root/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    root/VOCdevkit/VOC2012/SegmentationClass/<id>.png     'P' PNG, VOC palette, 255 on borders
    root/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png  'L' PNG, same labels, no 255
    root/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,trainaug,val}.txt
    root/meta.json, root/README.txt

ImageNet train = VOC trainaug, ImageNet val = VOC val, and VOC train is every second trainaug id
(a subset, as in the real VOC 2012 + SBD split).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from densedino.data.constants import voc_palette
from densedino.data.synthetic import (
    APPEARANCES,
    CLASSES,
    MIN_IMAGE_SIZE,
    NUM_CLASSES,
    PALETTE,
    render_scene,
    scene_rng,
    with_ignore_border,
)

JPEG_QUALITY = 90
IGNORE_BORDER_RADIUS = 1  # 255 on a 2-pixel band across every label change
GENERATOR_VERSION = 2  # bump when the rendering changes, so cached datasets can be told apart
IMAGENET_DIR = "imagenet"
VOC_DIR = Path("VOCdevkit") / "VOC2012"
_VOC_PALETTE_FLAT = [channel for colour in voc_palette(256) for channel in colour]


@dataclass(frozen=True)
class DemoDatasetInfo:
    """Where a demo dataset was written and what it holds."""

    root: Path
    imagenet_train: Path
    imagenet_val: Path
    voc_root: Path
    classes: tuple[str, ...]
    seed: int
    image_size: int
    num_images: int
    appearance: str
    num_train: int
    num_val: int
    num_voc_train: int
    num_voc_trainaug: int
    num_voc_val: int
    train_class_counts: dict[str, int] = field(default_factory=dict)
    val_class_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def image_id(index: int) -> str:
    """File stem of image `index` (the same in both layouts)."""
    return f"{index:06d}"


def label_of_index(index: int) -> int:
    """Image-level label of image `index`: classes cycle so every class gets the same share."""
    return index % NUM_CLASSES


def is_val_index(index: int, val_fraction: float) -> bool:
    """Stratified split: within each class, images are sent to val evenly spaced at the rate
    `val_fraction` (rounded), so every class gets its share of val images."""
    rank = index // NUM_CLASSES  # position of the image among those of its class
    return int(np.floor((rank + 1) * val_fraction + 0.5)) > int(np.floor(rank * val_fraction + 0.5))


def _check_arguments(num_images: int, image_size: int, val_fraction: float, seed: int) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} pixels, got {image_size}")
    minimum = min_num_images(val_fraction)
    if num_images < minimum:
        raise ValueError(
            f"num_images={num_images} is too small for val_fraction={val_fraction}: every class "
            f"needs at least one image in each split, which takes num_images >= {minimum}"
        )


def min_num_images(val_fraction: float) -> int:
    """Fewest images for which every class has at least one train and one val image."""
    splits: set[bool] = set()
    rank = 0
    while len(splits) < 2:
        # The split pattern is the same for every class; the last class fills up last.
        splits.add(is_val_index(rank * NUM_CLASSES, val_fraction))
        rank += 1
    return rank * NUM_CLASSES


def _prepare_root(root: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing non-empty root unless `overwrite`; create the parent."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{root} is not empty; choose another root or pass overwrite=True (--overwrite)"
        )
    root.parent.mkdir(parents=True, exist_ok=True)


def _make_dirs(tmp: Path) -> None:
    for split in ("train", "val"):
        for name in CLASSES:
            (tmp / IMAGENET_DIR / split / name).mkdir(parents=True)
    voc_dirs = ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation")
    for sub in voc_dirs:
        (tmp / VOC_DIR / sub).mkdir(parents=True)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_scene(image: np.ndarray, mask: np.ndarray) -> tuple[bytes, bytes, bytes]:
    """(JPEG of the image, VOC 'P' PNG with ignore border, 'L' PNG of the plain mask)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    voc = Image.fromarray(with_ignore_border(mask, IGNORE_BORDER_RADIUS), mode="P")
    voc.putpalette(_VOC_PALETTE_FLAT)
    return buffer.getvalue(), _png_bytes(voc), _png_bytes(Image.fromarray(mask, mode="L"))


Task = tuple[int, int, int, float, str, str]


def _write_one(task: Task) -> tuple[int, int]:
    """Render image `index` and write its four files; returns (index, label)."""
    index, seed, image_size, val_fraction, appearance, tmp_name = task
    tmp = Path(tmp_name)
    rng = scene_rng(seed, index)
    image, mask, label = render_scene(rng, image_size, label_of_index(index), appearance)
    jpeg, voc_png, aug_png = encode_scene(image, mask)
    stem = image_id(index)
    split = "val" if is_val_index(index, val_fraction) else "train"
    (tmp / IMAGENET_DIR / split / CLASSES[label] / f"{stem}.jpg").write_bytes(jpeg)
    (tmp / VOC_DIR / "JPEGImages" / f"{stem}.jpg").write_bytes(jpeg)
    (tmp / VOC_DIR / "SegmentationClass" / f"{stem}.png").write_bytes(voc_png)
    (tmp / VOC_DIR / "SegmentationClassAug" / f"{stem}.png").write_bytes(aug_png)
    return index, label


def _run_tasks(tasks: list[Task], workers: int, show_progress: bool) -> dict[int, int]:
    """Run `_write_one` over all tasks (in-process for one worker); returns {index: label}."""
    results: Iterator[tuple[int, int]]
    pool = None
    if workers == 1:
        results = map(_write_one, tasks)
    else:
        pool = multiprocessing.Pool(workers)
        results = pool.imap_unordered(_write_one, tasks, chunksize=16)
    if show_progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(tasks), desc="rendering", unit="img")
    try:
        return dict(results)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _write_split_lists(tmp: Path, labels: dict[int, int], val_fraction: float) -> dict:
    """Write the VOC id lists; returns the ids of each list."""
    indices = sorted(labels)
    train = [image_id(i) for i in indices if not is_val_index(i, val_fraction)]
    val = [image_id(i) for i in indices if is_val_index(i, val_fraction)]
    lists = {"trainaug": train, "train": train[::2], "val": val}
    for name, ids in lists.items():
        path = tmp / VOC_DIR / "ImageSets" / "Segmentation" / f"{name}.txt"
        path.write_text("".join(f"{stem}\n" for stem in ids))
    return lists


def _class_counts(labels: dict[int, int], val_fraction: float, want_val: bool) -> dict[str, int]:
    counts = dict.fromkeys(CLASSES, 0)
    for index, label in labels.items():
        if is_val_index(index, val_fraction) == want_val:
            counts[CLASSES[label]] += 1
    return counts


_APPEARANCE_TEXT = {
    "class": "an object usually (p = 0.75) wears its class's\ncolour family and texture, "
    "random ones otherwise; quiet near-grey backgrounds.",
    "random": "colour and texture are random.",
}


def _readme(info: DemoDatasetInfo) -> str:
    return (
        "DenseDINO built-in procedural dataset (densedino.data.write_demo_dataset).\n\n"
        f"{info.num_images} images of {info.image_size}x{info.image_size} px, seed {info.seed}.\n"
        "Each image: 2-4 objects of distinct classes on a textured background. The class of an\n"
        f"object is its shape; appearance {info.appearance!r}: "
        f"{_APPEARANCE_TEXT[info.appearance]}\n"
        "Image-level label = class with the largest visible area.\n\n"
        f"Classes (ImageFolder index i, mask value i+1; 0 = background): {', '.join(CLASSES)}\n\n"
        f"imagenet/train: {info.num_train} images, imagenet/val: {info.num_val} images.\n"
        f"VOCdevkit/VOC2012: train {info.num_voc_train}, trainaug {info.num_voc_trainaug}, "
        f"val {info.num_voc_val} ids. Same scenes and ids as imagenet/ (train = trainaug[::2]).\n"
        "SegmentationClass: palette PNG, 255 = ignore on a 2-px band across label changes.\n"
        "SegmentationClassAug: grayscale PNG, same labels, no ignore band.\n"
    )


def _write_meta(tmp: Path, info: DemoDatasetInfo, val_fraction: float) -> None:
    meta = asdict(info)
    del meta["seconds"]  # not known yet, and it would make the output depend on the machine
    for key in ("root", "imagenet_train", "imagenet_val", "voc_root"):
        meta[key] = str(Path(meta[key]).relative_to(info.root))
    meta.update(
        root=".",
        val_fraction=val_fraction,
        palette=[list(colour) for colour in PALETTE],
        ignore_index=255,
        jpeg_quality=JPEG_QUALITY,
        generator_version=GENERATOR_VERSION,
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "README.txt").write_text(_readme(info))


def _move_into_place(tmp: Path, root: Path, overwrite: bool) -> None:
    """Swap the finished temp dir in for `root` (the old root is removed only afterwards)."""
    old = None
    if root.exists():
        _prepare_root(root, overwrite)  # re-check: something may have appeared meanwhile
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        root.rename(old)
    tmp.rename(root)
    if old is not None:
        shutil.rmtree(old)


def write_demo_dataset(
    root: str | os.PathLike[str],
    num_images: int = 2000,
    seed: int = 0,
    image_size: int = 128,
    val_fraction: float = 0.2,
    appearance: str = "class",
    workers: int | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
) -> DemoDatasetInfo:
    """Render `num_images` scenes and write them in both layouts under `root`.

    The output depends only on (num_images, seed, image_size, val_fraction, appearance): image i
    is drawn
    from `scene_rng(seed, i)`, whatever the number of `workers` (default: all CPUs). Files are
    written into a temporary sibling directory that is renamed to `root` at the end, so an
    interrupted run never leaves a half-written root. A non-empty `root` is refused unless
    `overwrite`.
    """
    root = Path(root).absolute()
    _check_arguments(num_images, image_size, val_fraction, seed)
    if appearance not in APPEARANCES:
        raise ValueError(f"appearance must be one of {APPEARANCES}, got {appearance!r}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _prepare_root(root, overwrite)

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        _make_dirs(tmp)
        tasks = [
            (i, seed, image_size, val_fraction, appearance, str(tmp)) for i in range(num_images)
        ]
        labels = _run_tasks(tasks, min(workers, num_images), show_progress)
        lists = _write_split_lists(tmp, labels, val_fraction)
        info = DemoDatasetInfo(
            root=root,
            imagenet_train=root / IMAGENET_DIR / "train",
            imagenet_val=root / IMAGENET_DIR / "val",
            voc_root=root / VOC_DIR,
            classes=CLASSES,
            seed=seed,
            image_size=image_size,
            num_images=num_images,
            appearance=appearance,
            num_train=len(lists["trainaug"]),
            num_val=len(lists["val"]),
            num_voc_train=len(lists["train"]),
            num_voc_trainaug=len(lists["trainaug"]),
            num_voc_val=len(lists["val"]),
            train_class_counts=_class_counts(labels, val_fraction, want_val=False),
            val_class_counts=_class_counts(labels, val_fraction, want_val=True),
        )
        _write_meta(tmp, info, val_fraction)
        _move_into_place(tmp, root, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DemoDatasetInfo(**{**asdict(info), "seconds": time.perf_counter() - start})


def _largest_class(mask: np.ndarray) -> int:
    """0-based class with the most pixels in a mask (background not counted)."""
    counts = np.bincount(mask.ravel(), minlength=256)[1 : NUM_CLASSES + 1]
    return int(np.argmax(counts))


def save_preview(
    root_or_info: str | os.PathLike[str] | DemoDatasetInfo,
    out_png: str | os.PathLike[str],
    n: int = 8,
    split: str = "val",
) -> Path:
    """Save a PNG grid: the first `n` images of a VOC split over their coloured masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    root = root_or_info.root if isinstance(root_or_info, DemoDatasetInfo) else Path(root_or_info)
    voc = root / VOC_DIR
    list_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"{list_file} not found; is {root} a demo dataset root?")
    ids = list_file.read_text().split()[:n]
    figure, axes = plt.subplots(2, len(ids), figsize=(1.8 * len(ids), 3.8), squeeze=False)
    for column, stem in enumerate(ids):
        image = Image.open(voc / "JPEGImages" / f"{stem}.jpg").convert("RGB")
        mask = Image.open(voc / "SegmentationClass" / f"{stem}.png")
        # The label comes from the plain mask: the ignore band would bias it to compact shapes.
        label = _largest_class(np.asarray(Image.open(voc / "SegmentationClassAug" / f"{stem}.png")))
        axes[0, column].imshow(image)
        axes[0, column].set_title(f"{stem}\n{CLASSES[label]}", fontsize=8)
        axes[1, column].imshow(mask.convert("RGB"))  # palette PNG: VOC colours, 255 in cream
        for axis in axes[:, column]:
            axis.axis("off")
    figure.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out

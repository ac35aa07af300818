"""`densedino-eval hbird|cluster|corr`: dense protocols for any ViT (densedino or timm)."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from densedino.cli.model_args import resolve_device
from densedino.evaluation.backbone import (
    Backbone,
    BackboneSpec,
    add_backbone_arguments,
    random_like,
)
from densedino.evaluation.dense import cluster as cluster_mod
from densedino.evaluation.dense import corr as corr_mod
from densedino.evaluation.dense import hbird as hbird_mod
from densedino.evaluation.dense.data import SegImages, seg_batches, voc_split
from densedino.evaluation.dense.report import (
    cluster_figure,
    corr_figure,
    hbird_figure,
    table,
    write_json,
)
from densedino.evaluation.errors import exits_on_bad_input
from densedino.evaluation.knn import IndexSpec

log = logging.getLogger("densedino.evaluation.dense")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

HBIRD_EPILOG = """Hummingbird retrieval segmentation (open-hummingbird-eval's protocol): a memory
bank of training patch features with soft labels (class fractions of each patch, 255 ignored) over E
augmented passes, class-balanced patch sampling; every val patch takes the softmax(sim / T)-
weighted labels of its k nearest memory patches (exact FAISS search on the bank itself, queries
in chunks; GPU / IVF / float16 bank options); bilinear upsampling; mIoU over one confusion matrix.

presets: voc-small / voc / voc-large = 512 px, 2 passes, memory 102,400 / 1,024,000 /
10,240,000 patches; demo = the built-in data: 128 px, 1 pass, 51,200 patches.

example:
  densedino-eval hbird --checkpoint work_dirs/demo/densedino/export/backbone.safetensors \\
      --data work_dirs/demo/data/VOCdevkit/VOC2012 --preset demo
"""

CLUSTER_EPILOG = """Leopart's overclustering: val patch features standardised, PCA to 50 (FAISS),
k-means (FAISS, 100 iterations, best of 5 restarts) for each K and seed; cluster maps and ground
truth at 100 x 100; greedy many-to-one matching for K > classes, Hungarian for K = classes; mean and
std of mIoU over seeds. Default K: the number of classes, 100, 300, 500.

presets: leopart = 448 px; demo = 128 px (the built-in data).
"""

CORR_EPILOG = """Cross-view correspondence: two augmented views per image (random resized crops of
area 0.4-1 and mirrors, photometric jitter), every patch centre of view A inside view B matched to
its most cosine-similar patch of B; PCK at 0.05 / 0.1 of the view side and mean error in
patches, for all / object / background points (object vs background from the masks of a VOC
folder; any folder of images works without them). Always reported beside the position-only
matcher (same cell of B, no pixel read) and, unless --no-random-baseline, a random-init ViT
of the same architecture.

presets: default = 224 px; demo = 128 px (the built-in data).
"""


# ------------------------------------------------------------------------------ options
def _add_common(parser: argparse.ArgumentParser, presets: tuple[str, ...], default: str) -> None:
    add_backbone_arguments(parser, layer=True)
    parser.add_argument("--data", required=True, type=Path, help="VOCdevkit/VOC2012 folder")
    parser.add_argument("--classes", default="auto", help="as `densedino-eval seg --classes`")
    parser.add_argument("--preset", default=default, choices=presets, help="sizes (see below)")
    parser.add_argument("--size", type=int, default=None, help="input side (overrides preset)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-images", type=int, default=None, help="first N images per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="JSON + figure folder")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument("--figure-images", type=int, default=4, help="images in the figure")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_dense_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register hbird, cluster and corr on a `densedino-eval` subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "hbird", help="Hummingbird retrieval segmentation", epilog=HBIRD_EPILOG, formatter_class=fmt
    )
    _add_common(p, tuple(hbird_mod.PRESETS), "voc")
    p.add_argument("--epochs", type=int, default=None, help="augmented passes E over train")
    p.add_argument("--memory", type=int, default=None, help="memory patches (0 = all patches)")
    p.add_argument("--k", type=int, default=hbird_mod.DEFAULT_K)
    p.add_argument("--temperature", type=float, default=hbird_mod.DEFAULT_TEMPERATURE)
    p.add_argument("--chunk-size", type=int, default=4096, help="queries per FAISS search")
    p.add_argument("--index", default="flat", choices=("flat", "ivf"), help="exact or IVF search")
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--bank-fp16", action="store_true", help="memory bank in float16")
    p.set_defaults(func=run_hbird, protocol="hbird")

    p = sub.add_parser(
        "cluster", help="Leopart overclustering", epilog=CLUSTER_EPILOG, formatter_class=fmt
    )
    _add_common(p, ("leopart", "demo"), "leopart")
    p.add_argument(
        "--ks", type=int, nargs="+", default=None, help="K list (default: C 100 300 500)"
    )
    p.add_argument("--seeds", type=int, default=5, help="k-means seeds per K")
    p.add_argument("--pca-dim", type=int, default=cluster_mod.PCA_DIM)
    p.add_argument("--iters", type=int, default=cluster_mod.ITERATIONS)
    p.add_argument("--restarts", type=int, default=cluster_mod.RESTARTS)
    p.add_argument("--gt-size", type=int, default=cluster_mod.GT_SIZE)
    p.set_defaults(func=run_cluster, protocol="cluster")

    p = sub.add_parser(
        "corr", help="cross-view correspondence", epilog=CORR_EPILOG, formatter_class=fmt
    )
    _add_common(p, ("default", "demo"), "default")
    p.add_argument(
        "--scale", type=float, nargs=2, default=corr_mod.DEFAULT_SCALE, metavar=("LO", "HI")
    )
    p.add_argument("--no-jitter", action="store_true", help="no photometric jitter")
    p.add_argument("--no-random-baseline", action="store_true", help="skip the random-init ViT")
    p.set_defaults(func=run_corr, protocol="corr")


# ----------------------------------------------------------------------------- helpers
def _size(args: argparse.Namespace, default: int, patch: int) -> int:
    size = args.size or default
    if size < patch or size % patch:
        raise ValueError(f"--size {size} must be a positive multiple of the patch size {patch}")
    return size


def _backbone(args: argparse.Namespace) -> Backbone:
    return BackboneSpec.from_args(args).load(layer=args.layer)


def _patch_fn(backbone: Backbone, device: torch.device) -> Callable[[Tensor], Tensor]:
    backbone.to(device)
    return lambda images: backbone.patch_features(images.to(device)).cpu()


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device(resolve_device(args.device))


def _work_dir(args: argparse.Namespace) -> Path:
    if args.work_dir is not None:
        return args.work_dir
    if args.checkpoint is not None:  # exported backbones share a file name: add the folder
        parts = [p for p in args.checkpoint.resolve().parts[-3:-1] if p not in ("export", "/")]
        name = "_".join([*parts[-1:], args.checkpoint.stem])
    else:
        name = args.timm_name or "model"
    return Path("work_dirs") / "dense" / f"{name}_{args.protocol}_{args.preset}"


def _header(args: argparse.Namespace, backbone: Backbone, size: int) -> dict[str, Any]:
    return {
        "protocol": args.protocol,
        "model": {
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
            "timm": args.timm_name,
            "weights": str(args.weights) if args.weights else None,
            "id": backbone.model_id,
            "arch": backbone.arch,
            "patch_size": backbone.patch_size,
            "embed_dim": backbone.embed_dim,
            "layer": backbone.layer if backbone.layer is not None else backbone.depth - 1,
        },
        "data": str(args.data),
        "preset": args.preset,
        "size": size,
        "seed": args.seed,
    }


def _finish(args: argparse.Namespace, result: dict[str, Any], text: str, start: float) -> None:
    result["seconds"] = time.perf_counter() - start
    out = args.out or _work_dir(args) / f"{args.protocol}_results.json"
    write_json(out, result)
    print(text)
    print(f"results: {out}" + (f"\nfigure: {result['figure']}" if result.get("figure") else ""))


# ------------------------------------------------------------------------------- hbird
@exits_on_bad_input("densedino-eval hbird")
def run_hbird(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    preset = hbird_mod.PRESETS[args.preset]
    backbone = _backbone(args)
    size = _size(args, preset.size, backbone.patch_size)
    epochs = preset.epochs if args.epochs is None else args.epochs
    memory = preset.memory if args.memory is None else (args.memory or None)
    if epochs < 1 or args.k < 1 or args.temperature <= 0:
        raise ValueError("--epochs and --k must be >= 1 and --temperature > 0")
    train = voc_split(args.data, "train", args.classes).subset(args.max_images)
    val = voc_split(args.data, "val", args.classes).subset(args.max_images)
    num_classes = len(train.classes)
    grid = (size // backbone.patch_size) ** 2
    views = len(train) * epochs
    per_image = None if memory is None else min(grid, max(1, memory // views))
    capacity = views * (grid if per_image is None else per_image)
    patch_fn = _patch_fn(backbone, _device(args))
    progress = not args.quiet
    generator = torch.Generator().manual_seed(args.seed)
    passes = (
        seg_batches(
            train, size, args.batch_size, augment=True, scale=preset.scale, generator=generator
        )
        for _ in range(epochs)
    )
    bank = hbird_mod.build_memory(
        patch_fn, passes, backbone.patch_size, num_classes, per_image=per_image, capacity=capacity,
        seed=args.seed, dtype=np.float16 if args.bank_fp16 else np.float32, progress=progress,
    )  # fmt: skip
    spec = IndexSpec(args.index, args.nlist, args.nprobe, gpu=None, gpu_fp16=args.bank_fp16)
    result = hbird_mod.evaluate(
        patch_fn, bank, seg_batches(val, size, args.batch_size), num_classes, k=args.k,
        temperature=args.temperature, chunk_size=args.chunk_size, index=spec,
        keep_examples=args.figure_images, progress=progress,
    )  # fmt: skip
    out = _header(args, backbone, size)
    out.update(
        train_images=len(train), val_images=len(val), epochs=epochs, memory=len(bank),
        patches_per_image=per_image, k=args.k, temperature=args.temperature,
        index=result.index, results=result.to_json(train.classes),
    )  # fmt: skip
    if args.figure_images:
        out["figure"] = str(hbird_figure(
            _work_dir(args) / "hbird.png", result.examples, train.palette,
            f"hbird {out['model']['id']}: mIoU {result.miou:.1f}",
        ))  # fmt: skip
    rows = [["mIoU", result.miou]] + [
        [name, 100 * float(v)]
        for name, v in zip(train.classes, result.iou, strict=True)
        if np.isfinite(v)
    ]
    text = (
        f"hbird on {args.data}: {len(train)} train x {epochs} passes -> memory {len(bank)}, "
        f"{len(val)} val, {size} px, k={args.k}\n"
    )
    _finish(args, out, text + table(["class", "IoU"], rows), start)
    return 0


# ----------------------------------------------------------------------------- cluster
def collect_val(
    patch_fn: Callable[[Tensor], Tensor],
    val: SegImages,
    size: int,
    batch_size: int,
    gt_size: int,
    keep: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(patch features [N, h, w, D], ground truth [N, G, G], the first `keep` views)."""
    feats, gts, views = [], [], []
    for images, masks, _ in seg_batches(val, size, batch_size):
        feats.append(patch_fn(images))
        gts.append(
            F.interpolate(masks[:, None].float(), size=(gt_size, gt_size), mode="nearest")[
                :, 0
            ].long()
        )
        if sum(len(v) for v in views) < keep:
            views.append(images[: keep - sum(len(v) for v in views)])
    return torch.cat(feats), torch.cat(gts), torch.cat(views) if views else torch.zeros(0)


@exits_on_bad_input("densedino-eval cluster")
def run_cluster(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    backbone = _backbone(args)
    size = _size(args, 448 if args.preset == "leopart" else 128, backbone.patch_size)
    val = voc_split(args.data, "val", args.classes).subset(args.max_images)
    num_classes = len(val.classes)
    ks = args.ks or [num_classes, 100, 300, 500]
    if args.seeds < 1 or min(ks) < 1:
        raise ValueError("--seeds and every K must be >= 1")
    features, gt, views = collect_val(
        _patch_fn(backbone, _device(args)),
        val,
        size,
        args.batch_size,
        args.gt_size,
        args.figure_images,
    )
    result = cluster_mod.overcluster(
        features, gt, num_classes, ks, [args.seed + i for i in range(args.seeds)],
        pca_dim=args.pca_dim, iterations=args.iters, restarts=args.restarts,
        keep_examples=args.figure_images,
    )  # fmt: skip
    out = _header(args, backbone, size)
    out.update(
        val_images=len(val), num_classes=num_classes, gt_size=args.gt_size, pca_dim=args.pca_dim,
        iterations=args.iters, restarts=args.restarts, seeds=args.seeds, results=result.to_json(),
    )  # fmt: skip
    if args.figure_images:
        out["figure"] = str(cluster_figure(
            _work_dir(args) / "cluster.png", views, gt[: len(views)], result.example_maps,
            val.palette, f"cluster {out['model']['id']}",
        ))  # fmt: skip
    rows = [[k, r["matching"], r["mIoU_mean"], r["mIoU_std"]] for k, r in out["results"].items()]
    text = f"overclustering on {args.data}: {len(val)} val images, {size} px, {args.seeds} seeds\n"
    _finish(args, out, text + table(["K", "matching", "mIoU mean", "std"], rows), start)
    return 0


# -------------------------------------------------------------------------------- corr
@dataclass(frozen=True)
class FolderImages:
    """Any folder of images (recursively), without masks."""

    files: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[Image.Image, None]:
        with Image.open(self.files[index]) as image:
            return image.convert("RGB"), None

    def subset(self, count: int | None) -> FolderImages:
        return self if count is None else FolderImages(self.files[:count])


def corr_images(data: Path, classes: str | None) -> SegImages | FolderImages:
    """The val split of a VOC folder (with masks), else every image under `data`."""
    if (data / "JPEGImages").is_dir() and (data / "ImageSets").is_dir():
        return voc_split(data, "val", classes)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data} is not a directory")
    files = tuple(sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {data}")
    return FolderImages(files)


@exits_on_bad_input("densedino-eval corr")
def run_corr(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    backbone = _backbone(args)
    size = _size(args, 224 if args.preset == "default" else 128, backbone.patch_size)
    images = corr_images(args.data, args.classes).subset(args.max_images)
    device = _device(args)
    lo, hi = args.scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"--scale needs 0 < LO <= HI <= 1, got {args.scale}")
    common = {
        "batch_size": args.batch_size, "scale": (lo, hi), "photometric": not args.no_jitter,
        "seed": args.seed, "progress": not args.quiet,
    }  # fmt: skip
    main = corr_mod.evaluate(
        _patch_fn(backbone, device), images, size, keep_examples=args.figure_images, **common
    )
    matchers = {"features": main.summary["features"], "position-only": main.summary["position"]}
    if not args.no_random_baseline:
        random = corr_mod.evaluate(
            _patch_fn(random_like(backbone, args.seed), device), images, size, **common
        )
        matchers["random-init features"] = random.summary["features"]
    out = _header(args, backbone, size)
    out.update(
        images=len(images), pairs=main.summary["pairs"],
        pairs_without_overlap=main.summary["pairs_without_overlap"], scale=[lo, hi],
        photometric=not args.no_jitter, results=matchers,
    )  # fmt: skip
    if args.figure_images:
        out["figure"] = str(corr_figure(
            _work_dir(args) / "corr.png", main.examples,
            "corr: view A | view B; green = within 0.1 of the side, x = the truth",
        ))  # fmt: skip
    rows = [
        [name, subset, s.get("pck@0.05", float("nan")), s.get("pck@0.1", float("nan")),
         s.get("err_patches", float("nan")), s["points"]]
        for name, subsets in matchers.items() for subset, s in subsets.items()
    ]  # fmt: skip
    text = f"correspondence on {args.data}: {len(images)} pairs, {size} px views\n"
    header = ["matcher", "subset", "PCK@0.05", "PCK@0.1", "err (patches)", "points"]
    _finish(args, out, text + table(header, rows), start)
    return 0

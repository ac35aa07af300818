"""`densedino-eval knn`: weighted k-NN accuracy of a frozen backbone on ImageNet-style folders.

Wiring (in ``evaluation/cli.py``)::

    sub = parser.add_subparsers(dest="command", required=True)
    add_knn_subcommand(sub)          # sets func=run_knn
    args = parser.parse_args(argv); return args.func(args)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from densedino.checks import check_temperature
from densedino.cli.model_args import resolve_device
from densedino.dist import finishes_process_group
from densedino.evaluation.backbone import BackboneSpec, add_backbone_arguments
from densedino.evaluation.errors import exits_on_bad_input
from densedino.evaluation.features import (
    DINO_CROP,
    DINO_RESIZE,
    DistContext,
    FeatureSet,
    extract_features,
    resize_for_crop,
    scan_image_folder,
)
from densedino.evaluation.knn import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TEMPERATURE,
    IndexSpec,
    KnnAccuracy,
    accuracies_to_json,
    build_index,
    check_k,
    describe_index,
    index_recall,
    knn_evaluate,
)

log = logging.getLogger("densedino.evaluation.knn")
DEFAULT_KS = (10, 20, 100, 200)
PROG = "densedino-eval knn"


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Image folders and the k-NN transform (crop, resize) and loading."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        required=True,
        type=Path,
        help="directory holding the split folders (<split>/<class>/*.jpg); for "
        "the built-in data: ROOT/imagenet",
    )
    group.add_argument("--train-split", default="train", help="split used as the bank")
    group.add_argument("--val-split", default="val", help="split that is classified")
    group.add_argument("--crop", type=int, default=DINO_CROP, help="center-crop size")
    group.add_argument(
        "--resize",
        type=int,
        default=None,
        help=f"short-side resize before the crop (None: crop x "
        f"{DINO_RESIZE}/{DINO_CROP}, i.e. {DINO_RESIZE} for 224, 146 for 128)",
    )
    group.add_argument("--batch-size", type=int, default=64, help="extraction batch per rank")
    group.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="data-loading processes per rank",
    )


def _add_vote_arguments(parser: argparse.ArgumentParser) -> None:
    """DINO's weighted vote: the k values and the temperature."""
    group = parser.add_argument_group("vote")
    group.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=list(DEFAULT_KS),
        help="numbers of neighbours (one search at the largest)",
    )
    group.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="vote weight exp(sim / T)"
    )


def _add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """The FAISS index and where and how it searches."""
    group = parser.add_argument_group("search")
    group.add_argument(
        "--index",
        default="flat",
        choices=("flat", "ivf"),
        help="exact inner-product index, or approximate inverted lists",
    )
    group.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(N))")
    group.add_argument(
        "--nprobe", type=int, default=None, help="IVF lists visited per query (default nlist/8)"
    )
    group.add_argument(
        "--recall-queries",
        type=int,
        default=1000,
        help="IVF: queries on which recall@k vs exact is measured (0 = all)",
    )
    group.add_argument(
        "--faiss-device",
        default="auto",
        choices=("auto", "cpu", "gpu"),
        help="where FAISS searches (auto: every GPU it sees, else the CPU)",
    )
    group.add_argument(
        "--faiss-fp16",
        action="store_true",
        help="GPU index: store the bank in float16 (half the GPU memory)",
    )
    group.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help="queries searched at a time (bounds the working memory)",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Results, the feature cache and progress bars."""
    group = parser.add_argument_group("output")
    group.add_argument(
        "--out",
        type=Path,
        default=Path("knn_results.json"),
        help="results JSON (the table goes to stdout)",
    )
    group.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="feature cache (None: knn_cache/ beside --out)",
    )
    group.add_argument(
        "--recompute",
        action="store_true",
        help="extract again even if cached features exist (and replace them)",
    )
    group.add_argument(
        "--fp16-cache",
        action="store_true",
        help="store the cached features in float16 (half the disk and memory)",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `knn` to `parser`, one group per concern."""
    add_backbone_arguments(parser)
    _add_data_arguments(parser)
    _add_vote_arguments(parser)
    _add_index_arguments(parser)
    _add_output_arguments(parser)
    return parser


def add_knn_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `knn` on an ``add_subparsers()`` object; it sets ``func=run_knn``."""
    parser = subparsers.add_parser(
        "knn",
        help="weighted k-NN classification (DINO protocol) with FAISS",
        description="Frozen-backbone weighted k-NN: L2-normalised CLS features (after the final "
        "norm; a --timm ViT gives its pre-logits, which are the CLS token for class-token "
        "ViTs), DINO's exp(sim/T) vote, top-1/top-5 for every k. Features are cached beside the "
        "results, keyed by the weights' hash; under torchrun the extraction is sharded across "
        "ranks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_knn)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of the `knn` options (used by tests and `python -m`)."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    return add_arguments(parser)


# ---------------------------------------------------------------------------------- helpers
def _check_args(args: argparse.Namespace) -> tuple[IndexSpec, int]:
    """Validate the numeric options; return the index spec and the resize."""
    check_temperature(args.temperature)
    check_k(args.k, sys.maxsize)
    for name in ("batch_size", "chunk_size", "crop"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0 or args.recall_queries < 0:
        raise ValueError("--workers and --recall-queries must be >= 0")
    resize = resize_for_crop(args.crop) if args.resize is None else args.resize
    if resize < args.crop:
        raise ValueError(f"--resize ({resize}) must be >= --crop ({args.crop})")
    if args.index == "flat" and (args.nlist or args.nprobe):
        raise ValueError("--nlist/--nprobe need --index ivf")
    gpu = {"auto": None, "cpu": False, "gpu": True}[args.faiss_device]
    if args.faiss_fp16 and gpu is False:
        raise ValueError("--faiss-fp16 applies to GPU indexes only")
    spec = IndexSpec(args.index, args.nlist, args.nprobe, gpu=gpu, gpu_fp16=args.faiss_fp16)
    return spec, resize


def _init_distributed() -> DistContext:
    """Join the torchrun group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return DistContext.current()


def _device(choice: str | None) -> torch.device:
    return torch.device(resolve_device(choice))


def _model_factory(source: BackboneSpec, crop: int) -> Callable[[], torch.nn.Module]:
    def load() -> torch.nn.Module:
        backbone = source.load()
        if crop % backbone.patch_size:
            raise ValueError(
                f"--crop {crop} is not a multiple of the model's patch size {backbone.patch_size}"
            )
        # Its forward is the feature: our ViT's CLS token, a timm ViT's pre-logits (the CLS
        # token after the final norm for class-token ViTs; see evaluation/backbone.py).
        return backbone.model

    return load


def format_table(accuracies: Mapping[int, KnnAccuracy], header: str) -> str:
    """The accuracies as a fixed-width text table."""
    lines = [header, f"{'k':>6} {'top-1':>8} {'top-5':>8}"]
    lines += [f"{k:>6} {a.top1:>8.2f} {a.top5:>8.2f}" for k, a in sorted(accuracies.items())]
    return "\n".join(lines)


def _split_summary(features: FeatureSet, files: int) -> dict[str, Any]:
    return {
        "images": files,
        "used": len(features),
        "skipped": len(features.skipped),
        "skipped_files": [{"file": f, "error": e} for f, e in features.skipped[:100]],
        "cache": "hit" if features.from_cache else "miss",
        "cache_path": str(features.path),
    }


# -------------------------------------------------------------------------------------- run
def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the k-NN evaluation; the results dict on rank 0, None on other ranks."""
    start = time.perf_counter()
    spec, resize = _check_args(args)
    source = BackboneSpec.from_args(args)
    model_id = source.model_id()  # the weights' hash: keys the feature cache
    dist = _init_distributed()
    progress = not args.quiet and dist.rank == 0
    train_list = scan_image_folder(args.data / args.train_split)
    val_list = scan_image_folder(args.data / args.val_split, classes=train_list.classes)
    ks = check_k(args.k, len(train_list))
    cache_dir = args.cache_dir or args.out.parent / "knn_cache"
    load = _model_factory(source, args.crop)
    model: list[torch.nn.Module] = []  # loaded once, only if some split misses the cache

    def factory() -> torch.nn.Module:
        if not model:
            model.append(load())
        return model[0]

    common = {
        "resize": resize,
        "crop": args.crop,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "device": _device(args.device),
        "fp16": args.fp16_cache,
        "recompute": args.recompute,
        "progress": progress,
        "dist": dist,
    }
    extract_start = time.perf_counter()
    train = extract_features(
        factory, train_list, cache_dir, model_id, name=args.train_split, **common
    )
    val = extract_features(factory, val_list, cache_dir, model_id, name=args.val_split, **common)
    if train is None or val is None:  # not rank 0: rank 0 searches alone
        return None
    extract_seconds = time.perf_counter() - extract_start
    ks = check_k(ks, len(train))  # corrupt files may have shrunk the bank

    search_start = time.perf_counter()
    index = build_index(train.features, spec, progress=progress)
    accuracies = knn_evaluate(
        None,
        train.labels,
        val.features,
        val.labels,
        ks,
        args.temperature,
        len(train_list.classes),
        chunk_size=args.chunk_size,
        index=index,
        progress=progress,
    )
    search_seconds = time.perf_counter() - search_start
    result: dict[str, Any] = {
        **source.describe(),
        "arch": args.arch,
        "model_id": model_id,
        "data": str(args.data),
        "num_classes": len(train_list.classes),
        "train": _split_summary(train, len(train_list)),
        "val": _split_summary(val, len(val_list)),
        "transform": {"resize": resize, "crop": args.crop, "interpolation": "bicubic"},
        "temperature": args.temperature,
        "index": describe_index(index),
        "results": accuracies_to_json(accuracies),
        "seconds": {"extract": extract_seconds, "search": search_seconds},
    }
    if spec.kind == "ivf":
        recall = index_recall(
            index, train.features, val.features, ks, max_queries=args.recall_queries or None
        )
        result["recall_vs_exact"] = {str(k): r for k, r in recall.items()}
    result["seconds"]["total"] = time.perf_counter() - start
    return result


def _header(result: Mapping[str, Any]) -> str:
    train, val = result["train"], result["val"]
    skipped = train["skipped"] + val["skipped"]
    return (
        f"k-NN on {result['data']}: {train['used']} train / {val['used']} val images, "
        f"{result['num_classes']} classes, T={result['temperature']}, {result['index']}"
        + (f", {skipped} unreadable image(s) skipped" if skipped else "")
    )


@finishes_process_group
@exits_on_bad_input(PROG)
def run_knn(args: argparse.Namespace) -> int:
    """Entry point of `densedino-eval knn`: table on stdout, JSON in --out; exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Our progress messages only: FAISS' loader is chatty at INFO.
    logging.getLogger("densedino").setLevel(logging.WARNING if args.quiet else logging.INFO)
    result = evaluate(args)
    if result is None:
        return 0
    accuracies = {
        int(k): KnnAccuracy(int(k), v["top1"], v["top5"]) for k, v in result["results"].items()
    }
    print(format_table(accuracies, _header(result)))
    if "recall_vs_exact" in result:
        print(
            "IVF recall vs exact: "
            + ", ".join(f"@{k} {r:.3f}" for k, r in result["recall_vs_exact"].items())
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"results written to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m densedino.evaluation.knn_cli ...` (same options as `densedino-eval knn`)."""
    return run_knn(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

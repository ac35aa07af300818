"""`densedino-eval seg`: linear segmentation probe of a frozen backbone on Pascal VOC.

Wiring (in ``evaluation/cli.py``)::

    sub = parser.add_subparsers(dest="command", required=True)
    add_seg_subcommand(sub)          # sets func=run_seg
    args = parser.parse_args(argv); return args.func(args)
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from densedino.dist import finishes_process_group
from densedino.evaluation.backbone import BackboneSpec, add_backbone_arguments
from densedino.evaluation.errors import exits_on_bad_input

PROG = "densedino-eval seg"
DEFAULT_GRID_IMAGES = 8

EPILOG = """protocols (configs/seg/):
  leopart    Leopart's probe (the paper's): 448 crops, 25 epochs, SGD 0.01 * batch / 60,
             step x0.1 at epoch 20, features upsampled to 100 x 100 before the 1x1 conv,
             scored at 448 on val over all classes
  linear-bn  DINOv2's BN + linear head: 512 crops, AdamW 1e-3, poly, 40k iterations,
             sliding-window test
  demo       the Leopart protocol sized for the built-in data on 2 CPU cores
             (128 px crops, 29 x 29 labels, 4 epochs, batch 16, lr 0.3 * batch / 60)

classes: the built-in data is recognised by the meta.json that densedino-data writes above
VOCdevkit/VOC2012 (background + its shapes); any other folder is Pascal VOC (21 classes)
unless --classes says otherwise.

examples:
  densedino-eval seg --checkpoint work_dirs/demo/densedino/export/backbone.safetensors \\
      --data work_dirs/demo/data/VOCdevkit/VOC2012 --protocol demo
  densedino-eval seg --checkpoint dino_deitsmall16_pretrain_full_checkpoint.pth \\
      --data /data/VOCdevkit/VOC2012 --work-dir work_dirs/seg/dino_s16
  densedino-eval seg --timm vit_small_patch14_reg4_dinov2 --weights dinov2_vits14_reg4.pth \\
      --data /data/VOCdevkit/VOC2012 --crop-size 448   # patch 14: a 32 x 32 grid
  torchrun --nproc-per-node 4 -m densedino.evaluation.cli seg --launcher pytorch \\
      --checkpoint CKPT --data /data/VOCdevkit/VOC2012 --batch-size 15   # 4 x 15 = 60
"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `seg` to `parser`."""
    add_backbone_arguments(parser, device=False)  # mmengine's runner places the model
    parser.add_argument(
        "--data", required=True, type=Path, help="the VOC2012 folder (VOCdevkit/VOC2012)"
    )
    parser.add_argument(
        "--protocol",
        default="leopart",
        choices=("leopart", "linear-bn", "demo"),
        help="protocol config in configs/seg/ (see below)",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="an mmengine config instead of --protocol"
    )
    parser.add_argument(
        "--classes",
        default="auto",
        help="'auto' (built-in data if detected, else VOC), 'voc', or comma-separated names "
        "in label order (index 0 first)",
    )
    parser.add_argument(
        "--crop-size",
        type=int,
        default=None,
        help="square training crop / test size (scales the label size, pad and window too)",
    )
    parser.add_argument(
        "--mask-size", type=int, default=None, help="Leopart's training label size (100 at 448)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="length (epoch-based protocols)")
    parser.add_argument("--iters", type=int, default=None, help="length (linear-bn)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch per process")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes")
    parser.add_argument("--seed", type=int, default=None, help="random seed (config: 0)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="logs, head checkpoint, predictions/ (default: work_dirs/seg/<model>_<protocol>, "
        "<model> = the checkpoint's stem or the --timm name)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: WORK_DIR/seg_results.json)"
    )
    parser.add_argument(
        "--grid",
        type=int,
        default=DEFAULT_GRID_IMAGES,
        help="val images in WORK_DIR/seg_grid.png (0: no grid)",
    )
    parser.add_argument(
        "--launcher",
        default="auto",
        choices=("auto", "none", "pytorch"),
        help="'pytorch' under torchrun (NCCL on GPU, gloo on CPU); auto: pytorch when "
        "WORLD_SIZE > 1",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config entries last, e.g. optim_wrapper.optimizer.lr=0.02",
    )
    return parser


def add_seg_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `seg` on an ``add_subparsers()`` object; it sets ``func=run_seg``."""
    parser = subparsers.add_parser(
        "seg",
        help="linear segmentation probe on Pascal VOC (Leopart protocol) with mmsegmentation",
        description="Train a linear head on the frozen backbone's last-layer patch tokens with "
        "mmengine's Runner and mmsegmentation, then score it on val: mIoU and per-class IoU "
        "(table on stdout, JSON), predictions as label PNGs and a PNG grid. GPU when "
        "available, CPU otherwise; under torchrun with --launcher pytorch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_seg)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of the `seg` options (used by tests and `python -m`)."""
    parser = argparse.ArgumentParser(
        prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return add_arguments(parser)


# ---------------------------------------------------------------------------------- helpers
def _parse_cfg_options(items: Sequence[str]) -> dict[str, Any]:
    from mmengine.config import DictAction

    namespace = argparse.Namespace()
    try:
        DictAction(option_strings=[], dest="opts")(None, namespace, list(items))
    except ValueError as error:
        raise ValueError(f"--cfg-options: {error}") from error
    return namespace.opts or {}


def _launcher(choice: str) -> str:
    if choice != "auto":
        return choice
    return "pytorch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"


def settings_from_args(args: argparse.Namespace) -> Any:
    """The :class:`ProbeSettings` of parsed arguments."""
    from densedino.evaluation.seg.probe import ProbeSettings, protocol_config

    model = BackboneSpec.from_args(args)
    config = args.config or protocol_config(args.protocol)
    name = args.protocol if args.config is None else config.stem
    work_dir = args.work_dir or Path("work_dirs") / "seg" / f"{model.name}_{name}"
    return ProbeSettings(
        checkpoint=args.checkpoint,
        timm_name=args.timm_name,
        weights=args.weights,
        data=args.data,
        config=config,
        work_dir=work_dir,
        arch=args.arch,
        which=args.which,
        classes=args.classes,
        crop_size=args.crop_size,
        mask_size=args.mask_size,
        epochs=args.epochs,
        iters=args.iters,
        batch_size=args.batch_size,
        workers=args.workers,
        seed=args.seed,
        launcher=_launcher(args.launcher),
        cfg_options=_parse_cfg_options(args.cfg_options),
    )


def make_result(settings: Any, run: Any, outcome: Any, protocol: str) -> dict[str, Any]:
    """The results dict written as JSON (IoU and accuracy in percent)."""
    from densedino.evaluation.seg.report import iou_json

    cfg = run.cfg
    train_cfg = cfg.train_cfg
    head = cfg.model.decode_head
    length = (
        {"epochs": train_cfg.max_epochs}
        if "max_epochs" in train_cfg
        else {"iters": train_cfg.get("max_iters")}
    )
    totals = outcome.totals
    return {
        **settings.model.describe(),
        "backbone": run.backbone,
        "protocol": protocol,
        "config": str(settings.config),
        "data": str(run.splits.root),
        "classes": list(run.classes.names),
        "classes_from": run.classes.source,
        "train": {
            "split": run.splits.train_split,
            "labels": run.splits.train_labels,
            "images": run.num_train,
        },
        "val": {"split": "val", "labels": run.splits.val_labels, "images": run.num_val},
        "schedule": {
            **length,
            "batch_size": cfg.train_dataloader.batch_size * outcome.world_size,
            "optimizer": cfg.optim_wrapper.optimizer.type,
            "lr": outcome.base_lr,
            "crop_size": list(cfg.model.data_preprocessor.size),
            "train_label_size": None if head.get("train_size") is None else list(head.train_size),
            "test_mode": cfg.model.test_cfg.get("mode", "whole"),
        },
        "mIoU": 100.0 * totals.miou(),
        "pixel_accuracy": 100.0 * totals.pixel_accuracy(),
        "per_class_iou": iou_json(run.classes.names, totals.iou()),
        "mmseg_metrics": {k: float(v) for k, v in outcome.metrics.items()},
        "pixels": {
            "labelled": totals.labelled.astype(np.int64).tolist(),
            "predicted": totals.predicted.astype(np.int64).tolist(),
            "intersection": totals.intersect.astype(np.int64).tolist(),
        },
        "predictions": str(Path(cfg.test_evaluator.output_dir)),
        "work_dir": str(settings.work_dir),
        "device": outcome.device,
        "world_size": outcome.world_size,
        "seconds": {"train": outcome.train_seconds, "test": outcome.test_seconds},
    }


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the probe; the results dict on rank 0 (JSON and grid written), None elsewhere."""
    from densedino.evaluation.seg.dataset import read_ids
    from densedino.evaluation.seg.probe import build_probe, run_probe
    from densedino.evaluation.seg.report import save_prediction_grid, write_json

    start = time.perf_counter()
    if args.grid < 0:
        raise ValueError(f"--grid must be >= 0, got {args.grid}")
    settings = settings_from_args(args)
    run = build_probe(settings)
    outcome = run_probe(run)
    if outcome is None:
        return None
    protocol = args.protocol if args.config is None else f"config {args.config}"
    result = make_result(settings, run, outcome, protocol)
    if args.grid:
        ids = sorted(read_ids(run.splits.root, run.splits.val_list))[: args.grid]
        grid = save_prediction_grid(
            run.splits.root,
            ids,
            Path(result["predictions"]),
            run.classes.names,
            run.classes.palette,
            settings.work_dir / "seg_grid.png",
            labels_dir=run.splits.val_labels,
        )
        result["grid"] = str(grid)
    result["seconds"]["total"] = time.perf_counter() - start
    result["results_json"] = str(args.out or settings.work_dir / "seg_results.json")
    write_json(result, Path(result["results_json"]))
    return result


@finishes_process_group
@exits_on_bad_input(PROG)
def run_seg(args: argparse.Namespace) -> int:
    """Entry point of `densedino-eval seg`: table on stdout, JSON in --out; exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = evaluate(args)
    if result is None:
        return 0
    from densedino.evaluation.seg.report import format_table

    print(format_table(result))
    print(f"predictions: {result['predictions']}/<id>.png (label indices)")
    if "grid" in result:
        print(f"grid: {result['grid']}")
    print(f"results written to {result['results_json']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m densedino.evaluation.seg.cli ...` (same options as `densedino-eval seg`)."""
    return run_seg(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

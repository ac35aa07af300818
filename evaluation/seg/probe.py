"""Build the probe's mmengine config from a protocol config and run it on the Runner."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config

from densedino.dist import init_cpu_process_group
from densedino.evaluation.backbone import BackboneSpec
from densedino.evaluation.seg.dataset import (
    ClassInfo,
    VOCSplits,
    read_ids,
    resolve_classes,
    resolve_splits,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "seg"
PROTOCOLS: dict[str, str] = {
    "leopart": "leopart_linear_voc.py",
    "linear-bn": "dinov2_linear-bn_voc.py",
    "demo": "leopart_linear_demo.py",
}
# Leopart trains on 100 x 100 labels for 448 crops; other crop sizes keep that ratio.
LEOPART_CROP, LEOPART_TRAIN_SIZE = 448, 100


@dataclass
class ProbeSettings:
    """What ``densedino-eval seg`` was asked to do (None = keep the config's value).

    The model is ``checkpoint`` (with ``arch``, ``which``) or ``timm_name`` with ``weights``."""

    checkpoint: Path | None
    data: Path
    config: Path
    work_dir: Path
    arch: str | None = None
    which: str = "teacher"
    classes: str | None = None
    crop_size: int | None = None
    mask_size: int | None = None
    epochs: int | None = None
    iters: int | None = None
    batch_size: int | None = None
    workers: int | None = None
    seed: int | None = None
    launcher: str = "none"
    cfg_options: dict[str, Any] = field(default_factory=dict)
    timm_name: str | None = None
    weights: Path | None = None

    @property
    def model(self) -> BackboneSpec:
        """The backbone options, checked (ValueError for a combination that makes no sense)."""
        return BackboneSpec.from_args(self)


@dataclass(frozen=True)
class ProbeRun:
    """The built config plus what the report needs to describe the run."""

    cfg: Config
    classes: ClassInfo
    splits: VOCSplits
    num_train: int
    num_val: int
    backbone: dict[str, Any]


def protocol_config(protocol: str) -> Path:
    """The config file of a protocol name (in the repository's configs/seg/)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    path = CONFIG_DIR / PROTOCOLS[protocol]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the protocol configs live in the repository's configs/seg/ "
            "(an editable install); elsewhere pass --config PATH"
        )
    return path


# ------------------------------------------------------------------------------- overrides
def _pipelines(cfg: Config) -> list[list[dict]]:
    return [cfg.train_dataloader.dataset.pipeline, cfg.test_dataloader.dataset.pipeline]


def set_crop_size(cfg: Config, size: int, mask_size: int | None) -> None:
    """Scale every size of the protocol to square crops of ``size`` pixels.

    Training crops, the test resize (Leopart: to ``size``; DINOv2: (4 size, size) rescale, as
    (2048, 512)), the pad size, the sliding window (stride 2/3 of it) and, for Leopart's head,
    the label size (100 / 448 of the crop unless ``mask_size`` is given).
    """
    if size < 1:
        raise ValueError(f"--crop-size must be >= 1, got {size}")
    changed = 0
    for pipeline in _pipelines(cfg):
        for step in pipeline:
            kind = step["type"]
            if kind == "PairedRandomResizedCrop":
                step["size"] = (size, size)
            elif kind == "RandomCrop":
                step["crop_size"] = (size, size)
            elif kind in ("Resize", "RandomResize"):
                step["scale"] = (4 * size, size) if step.get("keep_ratio") else (size, size)
            else:
                continue
            changed += 1
    if not changed:
        raise ValueError("--crop-size: the config's pipelines have no crop or resize to change")
    cfg.model.data_preprocessor.size = (size, size)
    test_cfg = cfg.model.test_cfg
    if test_cfg.get("mode") == "slide":
        stride = math.ceil(size * 2 / 3)
        test_cfg.update(crop_size=(size, size), stride=(stride, stride))
    head = cfg.model.decode_head
    if head.get("train_size") is not None and mask_size is None:
        side = max(1, round(size * LEOPART_TRAIN_SIZE / LEOPART_CROP))
        head.train_size = (side, side)


def set_mask_size(cfg: Config, size: int) -> None:
    """Leopart's training label size (the features are upsampled to it before the conv)."""
    if size < 1:
        raise ValueError(f"--mask-size must be >= 1, got {size}")
    if cfg.model.decode_head.get("train_size") is None:
        raise ValueError("--mask-size applies to the Leopart protocol (a head with train_size)")
    cfg.model.decode_head.train_size = (size, size)


def set_epochs(cfg: Config, epochs: int) -> None:
    """Epoch-based configs: the length, with the step milestones scaled alike (20 of 25)."""
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if cfg.train_cfg.get("type") != "EpochBasedTrainLoop":
        raise ValueError("--epochs needs an epoch-based protocol (leopart, demo); use --iters")
    old = cfg.train_cfg.max_epochs
    cfg.train_cfg.max_epochs = epochs
    for scheduler in cfg.param_scheduler:
        if "milestones" in scheduler:
            scaled = {max(1, round(m * epochs / old)) for m in scheduler.milestones}
            scheduler.milestones = sorted(scaled)


def set_iters(cfg: Config, iters: int) -> None:
    """Iteration-based configs: the length, with warm-up and poly spans scaled alike."""
    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    if cfg.train_cfg.get("type") != "IterBasedTrainLoop":
        raise ValueError("--iters needs an iteration-based protocol (linear-bn); use --epochs")
    old = cfg.train_cfg.max_iters
    cfg.train_cfg.max_iters = iters
    for scheduler in cfg.param_scheduler:
        for key in ("begin", "end"):
            if scheduler.get(key) is not None:
                scheduler[key] = round(scheduler[key] * iters / old)


def set_data(cfg: Config, splits: VOCSplits, classes: ClassInfo) -> None:
    """Point both dataloaders at the VOC folder, with the classes of the data."""
    # mmseg's PascalVOCDataset for VOC's own classes; it refuses other class lists.
    kind = "PascalVOCDataset" if classes.is_voc else "VOCLayoutDataset"
    metainfo = dict(classes=list(classes.names), palette=[list(c) for c in classes.palette])
    for loader, ann_file, labels in (
        (cfg.train_dataloader, splits.train_list, splits.train_labels),
        (cfg.test_dataloader, splits.val_list, splits.val_labels),
    ):
        loader.dataset.update(
            type=kind,
            data_root=str(splits.root),
            ann_file=ann_file,
            data_prefix=dict(img_path="JPEGImages", seg_map_path=labels),
            metainfo=metainfo,
        )
    cfg.model.decode_head.num_classes = len(classes.names)


def set_workers(cfg: Config, workers: int) -> None:
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    for loader in (cfg.train_dataloader, cfg.test_dataloader):
        loader.num_workers = workers
        loader.persistent_workers = workers > 0 and loader.get("persistent_workers", False)


def use_cpu(cfg: Config) -> None:
    """Settings for torchrun without GPUs (gloo, DDP without device ids, plain BN)."""
    cfg.env_cfg.dist_cfg.backend = "gloo"
    # mmengine passes device_ids=[LOCAL_RANK] to DDP, which CPU modules refuse; an explicit
    # None in the config is kept.
    cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)
    norm = cfg.model.decode_head.get("norm_cfg")
    if norm is not None and norm.get("type") == "SyncBN":
        norm.type = "BN"  # SyncBN has no CPU kernel (one process reverts it to BN anyway)


def _world_size(launcher: str) -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launcher == "pytorch" else 1


def _describe_backbone(spec: BackboneSpec) -> dict[str, Any]:
    """Load the backbone once up front: a bad checkpoint fails before the Runner starts, and
    the head's width is the model's own."""
    backbone = spec.load()
    return {
        "kind": backbone.kind,
        "arch": backbone.arch,
        "embed_dim": backbone.embed_dim,
        "patch_size": backbone.patch_size,
        "depth": backbone.depth,
        "id": backbone.model_id,
    }


def _absolute(path: Path | None) -> str | None:
    """A path for the config: absolute, as a string."""
    return None if path is None else str(Path(path).resolve())


def build_probe(settings: ProbeSettings) -> ProbeRun:
    """The protocol config with the run's checkpoint, data, sizes and overrides applied."""
    model = settings.model
    model.check_file()
    if not settings.config.is_file():
        raise FileNotFoundError(f"no config file at {settings.config}")
    voc_root = settings.data.resolve()
    splits = resolve_splits(voc_root)
    classes = resolve_classes(voc_root, settings.classes)
    backbone = _describe_backbone(model)

    cfg = Config.fromfile(str(settings.config))
    cfg.work_dir = str(settings.work_dir)
    cfg.launcher = settings.launcher
    if not torch.cuda.is_available():
        use_cpu(cfg)
    if settings.seed is not None:
        cfg.randomness.seed = settings.seed
    cfg.model.backbone.update(
        checkpoint=_absolute(model.checkpoint),
        arch=model.arch,
        which=model.which,
        timm=model.timm_name,
        weights=_absolute(model.weights),
    )
    cfg.model.decode_head.in_channels = backbone["embed_dim"]
    set_data(cfg, splits, classes)
    if settings.crop_size is not None:
        set_crop_size(cfg, settings.crop_size, settings.mask_size)
    if settings.mask_size is not None:
        set_mask_size(cfg, settings.mask_size)
    if settings.epochs is not None:
        set_epochs(cfg, settings.epochs)
    if settings.iters is not None:
        set_iters(cfg, settings.iters)
    if settings.batch_size is not None:
        if settings.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {settings.batch_size}")
        cfg.train_dataloader.batch_size = settings.batch_size
    if settings.workers is not None:
        set_workers(cfg, settings.workers)
    cfg.test_evaluator.output_dir = str(settings.work_dir / "predictions")
    cfg.merge_from_dict(settings.cfg_options)

    num_train = len(read_ids(voc_root, splits.train_list))
    num_val = len(read_ids(voc_root, splits.val_list))
    total_batch = cfg.train_dataloader.batch_size * _world_size(settings.launcher)
    if num_val == 0:
        raise ValueError(f"{voc_root / splits.val_list} lists no image")
    if cfg.train_dataloader.get("drop_last") and num_train < total_batch:
        raise ValueError(
            f"{num_train} training images ({splits.train_list}) are fewer than one batch of "
            f"{total_batch}: lower --batch-size"
        )
    return ProbeRun(cfg, classes, splits, num_train, num_val, backbone)


@dataclass(frozen=True)
class ProbeOutcome:
    """What the Runner produced, on rank 0."""

    metrics: dict[str, float]  # mmseg's summary (rounded)
    base_lr: float  # the optimizer's starting lr, after auto_scale_lr
    totals: Any  # densedino.evaluation.seg.metric.PixelTotals
    world_size: int
    device: str
    train_seconds: float
    test_seconds: float


def run_probe(run: ProbeRun) -> ProbeOutcome | None:
    """Train the head on the Runner, then score it on val; None on ranks other than 0."""
    from mmengine.dist import get_world_size, is_main_process
    from mmengine.runner import Runner

    # Registers our modules (the config's custom_imports does too, for plain mmseg tools).
    from densedino.evaluation.seg import backbone, dataset, head, metric  # noqa: F401

    predictions = Path(run.cfg.test_evaluator.output_dir)
    if int(os.environ.get("RANK", "0")) == 0 and predictions.is_dir():
        # A previous run's PNGs would mix with this run's (every rank writes its share later,
        # after training has synchronised the ranks).
        for old in predictions.glob("*.png"):
            old.unlink(missing_ok=True)
    # Made by every rank: mmseg's metric creates it on rank 0 only, and another rank may save
    # its first prediction before rank 0 has built its metric.
    predictions.mkdir(parents=True, exist_ok=True)
    init_cpu_process_group(run.cfg.launcher)
    runner = Runner.from_cfg(run.cfg)
    start = time.perf_counter()
    runner.train()
    trained = time.perf_counter()
    metrics = runner.test()
    tested = time.perf_counter()
    if not is_main_process():
        return None
    totals = runner.test_evaluator.metrics[0].totals
    device = str(next(runner.model.parameters()).device)
    group = runner.optim_wrapper.param_groups[0]
    return ProbeOutcome(
        metrics=dict(metrics),
        base_lr=float(group.get("initial_lr", group["lr"])),
        totals=totals,
        world_size=get_world_size(),
        device=device,
        train_seconds=trained - start,
        test_seconds=tested - trained,
    )

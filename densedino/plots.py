"""Figures of a main-job work dir (``python -m densedino.plots --work-dir work_dirs/demo``).

Written to ``<work_dir>/figures/``:

- ``loss_curves.png``: the training loss of every pretrained method against the iteration, and
  per method its logged components (``loss_cls``, ``loss_ref``, ...), read from mmengine's
  ``<work_dir>/<method>/<timestamp>/vis_data/scalars.json`` (resumed runs are joined);
- ``attention_maps.png``: for the first val images of the built-in data (sorted ids, as the
  seg probe's grid), the image, its mask, then the last block's CLS attention of every head of
  every model (random-init and the methods), blended over the image;
- ``seg_predictions_<model>.png``: a copy of each model's seg probe prediction grid.

Every figure depends only on its inputs (no timestamps, fixed layout), so the same work dir
gives the same files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densedino.data.eval_transform import normalize
from densedino.models.vit import VisionTransformer
from densedino.serve import visualize as vis

FIGURES_DIR = "figures"
BASELINE = "random-init"
DEFAULT_IMAGES = 4
VOC_SUBDIR = Path("data") / "VOCdevkit" / "VOC2012"
CAPTION_SIZE = 12  # px; "random-init head 0" fits a 128 px tile

Series = tuple[list[int], list[float]]  # (iterations, values)


# ------------------------------------------------------------------------------ loss curves
def read_scalars(path: Path) -> list[dict]:
    """The records of one mmengine ``scalars.json`` (one JSON object per line)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_records(method_dir: Path) -> list[dict]:
    """The training records of every run in a method's work dir, one per iteration.

    Runs are read in timestamp order; where a resumed run logged an iteration again, its
    record replaces the earlier one. Records without a ``loss`` (e.g. validation) are skipped.
    """
    by_step: dict[int, dict] = {}
    for path in sorted(method_dir.glob("*/vis_data/scalars.json")):
        for record in read_scalars(path):
            step = record.get("step", record.get("iter"))
            if "loss" in record and step is not None:
                by_step[int(step)] = record
    return [by_step[step] for step in sorted(by_step)]


def loss_series(records: Iterable[Mapping]) -> dict[str, Series]:
    """``loss`` and every ``loss_*`` key of the records, each as (iterations, values)."""
    series: dict[str, Series] = {}
    for record in records:
        step = int(record.get("step", record.get("iter", 0)))
        for key, value in record.items():
            if key == "loss" or key.startswith("loss_"):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    return dict(sorted(series.items(), key=lambda item: (item[0] != "loss", item[0])))


def plot_loss_curves(losses: Mapping[str, Mapping[str, Series]], out: Path) -> Path:
    """PNG: the total loss of every method in one panel, then one panel per method with its
    loss components. ``losses``: method -> key -> (iterations, values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not losses:
        raise ValueError("no method to plot")
    panels = 1 + len(losses)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    total = axes[0, 0]
    for method, series in losses.items():
        if "loss" in series:
            _plot_series(total, *series["loss"], label=method)
    total.set_title("training loss")
    for axis, (method, series) in zip(axes[0, 1:], losses.items(), strict=True):
        for key, values in series.items():
            _plot_series(axis, *values, label=key)
        axis.set_title(f"{method}: loss components")
        if not series:
            axis.text(0.5, 0.5, "no loss logged", ha="center", va="center")
    for axis in axes[0]:
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    axes[0, 0].set_ylabel("loss")
    for axis in axes[0]:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    return _save_figure(figure, out)


def _plot_series(axis, steps: Sequence[int], values: Sequence[float], label: str) -> None:
    """A line, with markers when there are few points (a tiny run may log one or two)."""
    marker = "o" if len(steps) <= 20 else None
    axis.plot(steps, values, marker=marker, markersize=3, linewidth=1.2, label=label)


def _save_figure(figure, out: Path) -> Path:
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" entry: the bytes then depend on the drawing only, not on the version.
    figure.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(figure)
    return out


# --------------------------------------------------------------------------- attention maps
def val_ids(voc_root: Path, count: int) -> list[str]:
    """The first ``count`` ids of the VOC val list, sorted (the seg probe's grid shows these)."""
    list_file = voc_root / "ImageSets" / "Segmentation" / "val.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"{list_file} not found; is {voc_root} a VOC2012 folder?")
    return sorted(list_file.read_text().split())[:count]


def load_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as uint8 RGB, optionally resized to ``size`` (height, width)."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return rgb if size is None else vis.resize(rgb, size)


def input_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The image size rounded to multiples of the patch size (at least one patch)."""
    return (
        max(patch_size, round(height / patch_size) * patch_size),
        max(patch_size, round(width / patch_size) * patch_size),
    )


@torch.inference_mode()
def cls_attention_maps(model: VisionTransformer, image: np.ndarray) -> np.ndarray:
    """Last-block CLS attention over the patches of one uint8 RGB image: [heads, h, w].

    The image must already have a size that is a multiple of the patch size.
    """
    x = normalize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))[None]
    attn = model.eval().get_last_selfattention(x)[0]
    grid = (image.shape[0] // model.patch_size, image.shape[1] // model.patch_size)
    return vis.cls_attention(attn, grid)


def attention_row(
    image: np.ndarray,
    mask: np.ndarray | None,
    image_id: str,
    maps: Mapping[str, np.ndarray],
) -> list[np.ndarray]:
    """The captioned tiles of one image: the image, its mask, then every model's heads."""
    size = image.shape[:2]
    tiles = [vis.caption(image, image_id, size=CAPTION_SIZE)]
    if mask is not None:
        tiles.append(vis.caption(mask, "mask", size=CAPTION_SIZE))
    for model, heads in maps.items():
        for head, values in enumerate(heads):
            heat = vis.blend(image, vis.colorize(values, size), alpha=0.7)
            tiles.append(vis.caption(heat, f"{model} head {head}", size=CAPTION_SIZE))
    return tiles


def attention_figure(
    checkpoints: Mapping[str, Path], voc_root: Path, count: int = DEFAULT_IMAGES
) -> np.ndarray:
    """The attention grid (uint8 RGB): one row per val image, one column per model and head."""
    from densedino.weights import load_backbone

    if not checkpoints:
        raise ValueError("no model to show")
    models = {name: load_backbone(path) for name, path in checkpoints.items()}
    patch = max(model.patch_size for model in models.values())
    rows: list[np.ndarray] = []
    columns = 0
    for image_id in val_ids(voc_root, count):
        original = load_rgb(voc_root / "JPEGImages" / f"{image_id}.jpg")
        size = input_size(*original.shape[:2], patch)
        image = vis.resize(original, size)
        mask_path = voc_root / "SegmentationClass" / f"{image_id}.png"
        mask = load_rgb(mask_path, size) if mask_path.is_file() else None
        maps = {name: cls_attention_maps(model, image) for name, model in models.items()}
        tiles = attention_row(image, mask, image_id, maps)
        columns = max(columns, len(tiles))
        rows.extend(tiles)
    if not rows:
        raise ValueError(f"no val image in {voc_root}")
    return vis.tile(rows, columns)


def save_attention_maps(
    checkpoints: Mapping[str, Path], voc_root: Path, out: Path, count: int = DEFAULT_IMAGES
) -> Path:
    """Write :func:`attention_figure` as a PNG."""
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(attention_figure(checkpoints, voc_root, count)).save(out)
    return out


# ------------------------------------------------------------------------- seg predictions
def seg_grid_path(work_dir: Path, model: str) -> Path:
    """Where the pipeline's seg probe of ``model`` left its prediction grid."""
    result = work_dir / "eval" / f"seg_{model}.json"
    if result.is_file():
        grid = json.loads(result.read_text()).get("grid")
        if grid and Path(grid).is_file():
            return Path(grid)
    return work_dir / "eval" / f"seg_{model}" / "seg_grid.png"


def copy_seg_grids(work_dir: Path, models: Iterable[str], out_dir: Path) -> list[Path]:
    """Copy each model's seg prediction grid to ``out_dir/seg_predictions_<model>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for model in models:
        source = seg_grid_path(work_dir, model)
        if not source.is_file():
            raise FileNotFoundError(f"no seg prediction grid of {model} at {source}")
        copies.append(Path(shutil.copyfile(source, out_dir / f"seg_predictions_{model}.png")))
    return copies


# -------------------------------------------------------------------------------- a work dir
def pretrained_methods(work_dir: Path) -> list[str]:
    """Methods trained in the work dir: the results' order, else those with logged scalars."""
    results = work_dir / "results.json"
    if results.is_file():
        names = list(json.loads(results.read_text()).get("knn", {}))
        return [name for name in names if name != BASELINE]
    return sorted({path.parents[2].name for path in work_dir.glob("*/*/vis_data/scalars.json")})


def model_checkpoints(work_dir: Path, methods: Sequence[str]) -> dict[str, Path]:
    """The random-init baseline (when there is one) and every method's exported backbone."""
    checkpoints = {}
    baseline = work_dir / "random_init" / "backbone.safetensors"
    if baseline.is_file():
        checkpoints[BASELINE] = baseline
    for method in methods:
        checkpoints[method] = work_dir / method / "export" / "backbone.safetensors"
    return checkpoints


def make_figures(
    work_dir: Path,
    methods: Sequence[str] | None = None,
    checkpoints: Mapping[str, Path] | None = None,
    num_images: int = DEFAULT_IMAGES,
) -> list[Path]:
    """Write every figure of a work dir to ``<work_dir>/figures/``; their paths."""
    methods = list(pretrained_methods(work_dir) if methods is None else methods)
    if not methods:
        raise FileNotFoundError(f"no pretrained method in {work_dir}")
    checkpoints = dict(checkpoints or model_checkpoints(work_dir, methods))
    out_dir = work_dir / FIGURES_DIR
    losses = {m: loss_series(training_records(work_dir / m)) for m in methods}
    figures = [plot_loss_curves(losses, out_dir / "loss_curves.png")]
    voc_root = work_dir / VOC_SUBDIR
    figures.append(
        save_attention_maps(checkpoints, voc_root, out_dir / "attention_maps.png", num_images)
    )
    figures.extend(copy_seg_grids(work_dir, checkpoints, out_dir))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m densedino.plots",
        description="Draw the figures of a main-job work dir (python -m densedino.cli.pipeline) "
        "into WORK_DIR/figures/: loss curves, last-block CLS attention per head of every "
        "model on val images, and the seg probe's prediction grids.",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("work_dirs/demo"))
    parser.add_argument(
        "--images", type=int, default=DEFAULT_IMAGES, help="val images in attention_maps.png"
    )
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    try:
        figures = make_figures(args.work_dir, num_images=args.images)
    except (FileNotFoundError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    for path in figures:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

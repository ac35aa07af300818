"""The probe's outputs: the results dict (JSON), a text table and a PNG grid of predictions."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from densedino.data.constants import voc_palette

IGNORE_INDEX = 255


def iou_json(names: Sequence[str], iou: np.ndarray) -> dict[str, float | None]:
    """Per-class IoU in percent; None where the class is neither labelled nor predicted."""
    pairs = zip(names, iou, strict=True)
    return {n: (None if math.isnan(v) else 100.0 * float(v)) for n, v in pairs}


def model_label(result: Mapping[str, Any]) -> str:
    """The checkpoint, or the timm name with its weights file."""
    if result.get("timm"):
        return f"{result['timm']} ({result['weights']})"
    return str(result["checkpoint"])


def format_table(result: Mapping[str, Any]) -> str:
    """Per-class IoU, then mIoU and pixel accuracy, as a fixed-width text table."""
    per_class = result["per_class_iou"]
    width = max(12, *(len(name) for name in per_class))
    lines = [
        f"{result['protocol']} linear probe of {model_label(result)} on {result['data']}: "
        f"{result['train']['images']} {result['train']['split']} / {result['val']['images']} "
        f"val images, {len(per_class)} classes",
        f"{'class':<{width}} {'IoU':>7}",
    ]
    for name, value in per_class.items():
        lines.append(f"{name:<{width}} {'n/a' if value is None else f'{value:.2f}':>7}")
    lines.append(f"{'mIoU':<{width}} {result['mIoU']:>7.2f}")
    lines.append(f"{'pixel acc.':<{width}} {result['pixel_accuracy']:>7.2f}")
    return "\n".join(lines)


def write_json(result: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def colour_table(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """[256, 3] uint8: the dataset's colours first, the VOC colour map beyond (255 = cream)."""
    table = np.asarray(voc_palette(256), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return table


def read_labels(path: Path) -> np.ndarray:
    """A label PNG as class indices (palette PNGs give their indices, not colours)."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"{path}: expected a palette or grayscale label PNG, got {image.mode}")
        return np.asarray(image)


def save_prediction_grid(
    voc_root: Path,
    ids: Sequence[str],
    prediction_dir: Path,
    names: Sequence[str],
    palette: Sequence[Sequence[int]],
    out: Path,
    labels_dir: str = "SegmentationClass",
) -> Path:
    """One column per image: the image, its ground truth and the prediction, VOC colours.

    Predictions are stored at the resolution they were scored at; the image and the ground
    truth are shown at that resolution too (nearest for the labels, ignore = cream).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not ids:
        raise ValueError("no image to show")
    colours = colour_table(palette)
    legend_columns = 6
    legend_rows = math.ceil((len(names) + 1) / legend_columns)
    legend_height = 0.22 * legend_rows + 0.2  # inches
    height = 6.6 + legend_height
    figure, axes = plt.subplots(
        3, len(ids), figsize=(max(2.0 * len(ids), 7.0), height), squeeze=False
    )
    for column, stem in enumerate(ids):
        prediction = read_labels(prediction_dir / f"{stem}.png")
        size = (prediction.shape[1], prediction.shape[0])
        with Image.open(voc_root / "JPEGImages" / f"{stem}.jpg") as image:
            rgb = image.convert("RGB").resize(size, Image.BILINEAR)
        with Image.open(voc_root / labels_dir / f"{stem}.png") as gt:
            truth = np.asarray(gt.resize(size, Image.NEAREST))
        valid = truth != IGNORE_INDEX
        accuracy = 100.0 * float((prediction[valid] == truth[valid]).mean()) if valid.any() else 0
        axes[0, column].imshow(rgb)
        axes[0, column].set_title(stem, fontsize=8)
        axes[1, column].imshow(colours[truth])
        axes[2, column].imshow(colours[prediction])
        axes[2, column].set_xlabel(f"pixel acc. {accuracy:.0f}%", fontsize=8)
        for axis in axes[:, column]:
            axis.set_xticks([])
            axis.set_yticks([])
    for row, label in enumerate(("image", "ground truth", "prediction")):
        axes[row, 0].set_ylabel(label, fontsize=9)
    handles = [Patch(color=colours[i] / 255, label=n) for i, n in enumerate(names)]
    handles.append(Patch(color=colours[IGNORE_INDEX] / 255, label="ignore (255)"))
    figure.legend(handles=handles, loc="lower center", ncol=legend_columns, fontsize=8)
    figure.tight_layout(rect=(0, legend_height / height, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out

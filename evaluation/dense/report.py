"""Results JSON, stdout tables and matplotlib figures of the dense protocols."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from densedino.data.eval_transform import denormalize


def write_json(path: Path, result: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (floats with 2 decimals)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def to_rgb(view: Tensor) -> np.ndarray:
    """A normalised [3, H, W] view back to an [H, W, 3] float image in [0, 1]."""
    return denormalize(view).clamp(0, 1).permute(1, 2, 0).numpy()


def colourise(labels: Tensor, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Label map -> RGB with `palette`; 255 / -1 / beyond the palette are white."""
    table_ = np.full((257, 3), 255, dtype=np.uint8)
    for i, colour in enumerate(palette[:255]):
        table_[i] = colour
    index = labels.numpy().astype(np.int64)
    index = np.where((index < 0) | (index >= len(palette)), 256, index)
    return table_[index]


def _figure(rows: int, cols: int, scale: float = 2.0, aspect: float = 1.0):
    """A rows x cols grid of axes without ticks; each cell `scale` high, `aspect` x as wide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = (scale * aspect * cols, scale * rows + 0.4)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes


def _save(fig, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def hbird_figure(
    path: Path,
    examples: Sequence[tuple[Tensor, Tensor, Tensor]],
    palette: Sequence[Sequence[int]],
    title: str,
) -> Path:
    """Rows of (image, ground truth, retrieved labels)."""
    fig, axes = _figure(max(len(examples), 1), 3)
    for row, (view, mask, pred) in enumerate(examples):
        for col, (image, name) in enumerate(
            (
                (to_rgb(view), "image"),
                (colourise(mask, palette), "truth"),
                (colourise(pred, palette), "retrieved"),
            )
        ):
            axes[row, col].imshow(image)
            if row == 0:
                axes[row, col].set_title(name, fontsize=8)
    return _save(fig, path, title)


def cluster_figure(
    path: Path,
    views: Tensor,
    gt: Tensor,
    maps: Mapping[int, Tensor],
    palette: Sequence[Sequence[int]],
    title: str,
) -> Path:
    """Rows of (image, ground truth, the matched cluster map of each K)."""
    ks = sorted(maps)
    fig, axes = _figure(max(len(views), 1), 2 + len(ks))
    for row in range(len(views)):
        panels = [(to_rgb(views[row]), "image"), (colourise(gt[row], palette), "truth")]
        panels += [(colourise(maps[k][row], palette), f"K={k} (matched)") for k in ks]
        for col, (image, name) in enumerate(panels):
            axes[row, col].imshow(image)
            if row == 0:
                axes[row, col].set_title(name, fontsize=8)
    return _save(fig, path, title)


def corr_figure(path: Path, examples: Sequence[Any], title: str, lines: int = 12) -> Path:
    """View pairs side by side with lines from A's points to their matches in B.

    Green: within 0.1 of the view side of the truth; red: further.
    """
    from densedino.evaluation.dense.corr import errors_px, patch_centres

    fig, axes = _figure(max(len(examples), 1), 1, scale=2.5, aspect=2.0)
    for row, (view_a, view_b, crop_a, _, points) in enumerate(examples):
        ax = axes[row, 0]
        size = crop_a.size
        ax.imshow(np.concatenate([to_rgb(view_a), to_rgb(view_b)], axis=1))
        count, grid = len(points.a_index), points.grid
        centres = patch_centres(grid, size)
        err = errors_px(points.matched, points.truth_b, grid, size)
        pick = torch.linspace(0, count - 1, min(lines, count)).round().long() if count else []
        for i in pick:
            a = centres[points.a_index[i]]
            b = centres[points.matched[i]]
            colour = "lime" if err[i] <= 0.1 * size else "red"
            ax.plot([a[0], b[0] + size], [a[1], b[1]], color=colour, linewidth=0.8)
            ax.plot(
                [points.truth_b[i, 0] + size], [points.truth_b[i, 1]], "x", color="yellow", ms=3
            )
    return _save(fig, path, title)

"""Pure functions turning backbone outputs into pictures (used by the Gradio demo).

Maps are NumPy arrays; pictures are ``uint8`` RGB arrays [H, W, 3]. Nothing here runs a model:
the demo computes attention and features, these functions select, threshold, project and paint.
Coordinates follow the backbone's convention: reference points are (x, y) in [-1, 1] with
``align_corners=False``, so the centre of patch (row i, column j) of an h x w grid is
``((2j + 1) / w - 1, (2i + 1) / h - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image, ImageDraw, ImageFont

FloatArray = NDArray[np.floating]
RGB = NDArray[np.uint8]

# Colour of masks and of the clicked-point marker (DINO's visualisation uses random colours; a
# fixed one keeps screenshots comparable).
MASK_COLOUR = np.array([255, 64, 32], dtype=np.float64)
MARKER_COLOUR = (0, 255, 255)


# ------------------------------------------------------------------------------ selection
def cls_attention(attn: ArrayLike, grid: tuple[int, int]) -> FloatArray:
    """CLS row over the patches of one image's attention [heads, L, L] -> [heads, h, w].

    The patches are the last ``h * w`` tokens (sequence [CLS | REF.. | PATCH..]).
    """
    attn = as_float(attn)
    height, width = grid
    if attn.ndim != 3 or attn.shape[1] != attn.shape[2] or attn.shape[1] < 1 + height * width:
        raise ValueError(
            f"expected attention [heads, L, L] with L >= 1 + {height}*{width}, got {attn.shape}"
        )
    return attn[:, 0, -height * width :].reshape(attn.shape[0], height, width)


def reference_attention(attn: ArrayLike, grid: tuple[int, int], ref: int = 0) -> FloatArray:
    """Attention row of reference token ``ref`` over the patches: [heads, L, L] -> [heads, h, w].

    Reference token ``ref`` is token ``1 + ref`` of the sequence [CLS | REF.. | PATCH..].
    """
    attn = as_float(attn)
    height, width = grid
    num_patches = height * width
    num_refs = attn.shape[-1] - 1 - num_patches if attn.ndim == 3 else -1
    if attn.ndim != 3 or attn.shape[1] != attn.shape[2] or not 0 <= ref < num_refs:
        raise ValueError(
            f"expected attention [heads, L, L] holding reference token {ref} before "
            f"{height}*{width} patches, got {attn.shape}"
        )
    return attn[:, 1 + ref, -num_patches:].reshape(attn.shape[0], height, width)


def cosine_similarity_map(query: ArrayLike, patches: ArrayLike) -> FloatArray:
    """Cosine similarity of a feature [D] with every patch feature [h, w, D] -> [h, w]."""
    query, patches = as_float(query), as_float(patches)
    if query.ndim != 1 or patches.ndim != 3 or patches.shape[-1] != query.shape[0]:
        raise ValueError(
            f"expected query [D] and patches [h, w, D], got {query.shape}, {patches.shape}"
        )
    eps = 1e-12  # a zero vector has similarity 0 with everything instead of NaN
    query = query / max(float(np.linalg.norm(query)), eps)
    norms = np.maximum(np.linalg.norm(patches, axis=-1, keepdims=True), eps)
    return (patches / norms) @ query


def click_to_ref_point(col: float, row: float, width: int, height: int) -> tuple[float, float]:
    """Pixel (col, row) of a width x height image -> reference point (x, y) in [-1, 1].

    The point is the pixel's centre, so that normalised coordinates do not depend on the
    resolution the image is shown at (the model sees a resized copy).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not (0 <= col < width and 0 <= row < height):
        raise ValueError(f"pixel ({col}, {row}) lies outside the {width}x{height} image")
    return 2 * (col + 0.5) / width - 1, 2 * (row + 0.5) / height - 1


def ref_point_to_patch(point: tuple[float, float], grid: tuple[int, int]) -> tuple[int, int]:
    """The (row, column) of the patch that contains reference point (x, y) in [-1, 1]."""
    height, width = grid
    x, y = point
    col = min(max(int((x + 1) / 2 * width), 0), width - 1)
    row = min(max(int((y + 1) / 2 * height), 0), height - 1)
    return row, col


# ------------------------------------------------------------------------ DINO's masks, PCA
def mass_threshold_masks(maps: ArrayLike, threshold: float = 0.6) -> NDArray[np.bool_]:
    """Per map, the smallest set of cells holding at least ``threshold`` of its mass.

    ``maps`` [..., h, w] of non-negative weights (e.g. CLS attention per head); the result is a
    boolean mask of the same shape. As in DINO's ``visualize_attention.py``, cells are taken in
    decreasing order until their sum reaches ``threshold`` of the total. Ties are broken by
    position; a map without mass keeps nothing.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    maps = np.asarray(maps, dtype=np.float64)  # float64: sums over many small weights
    if maps.ndim < 2:
        raise ValueError(f"expected maps [..., h, w], got shape {maps.shape}")
    if (maps < 0).any():
        raise ValueError("maps must be non-negative")
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1])
    order = np.argsort(-flat, axis=-1, kind="stable")
    ranked = np.take_along_axis(flat, order, axis=-1)
    # A cell is needed while the mass of the cells ranked before it is still short of the goal.
    before = np.cumsum(ranked, axis=-1) - ranked
    goal = threshold * flat.sum(axis=-1, keepdims=True)
    keep_ranked = (before < goal) & (goal > 0)
    keep = np.zeros_like(keep_ranked)
    np.put_along_axis(keep, order, keep_ranked, axis=-1)
    return keep.reshape(maps.shape)


def pca_rgb(features: ArrayLike) -> FloatArray:
    """First three principal components of patch features [h, w, D] as RGB in [0, 1].

    Each component is min-max scaled over the image. Signs are fixed (largest loading
    positive) so that the colours do not flip between runs; missing components (D < 3 or
    fewer than 4 patches) and constant ones are mid-grey.
    """
    features = as_float(features).astype(np.float64)
    if features.ndim != 3:
        raise ValueError(f"expected features [h, w, D], got shape {features.shape}")
    height, width, dim = features.shape
    flat = features.reshape(height * width, dim)
    centred = flat - flat.mean(axis=0, keepdims=True)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    components = components[:3]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    projected = centred @ (components * signs[:, None]).T  # [N, k], k <= 3
    rgb = np.full((height * width, 3), 0.5)
    for c in range(projected.shape[1]):
        low, high = projected[:, c].min(), projected[:, c].max()
        if high - low > 1e-9 * max(1.0, abs(high)):
            rgb[:, c] = (projected[:, c] - low) / (high - low)
    return rgb.reshape(height, width, 3)


# -------------------------------------------------------------------------------- painting
def normalise(values: ArrayLike) -> FloatArray:
    """Min-max scale to [0, 1]; a constant map becomes zeros."""
    values = as_float(values)
    low, high = float(values.min()), float(values.max())
    if high - low <= 0:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def colorize(
    values: ArrayLike, size: tuple[int, int], cmap: str = "inferno", normalised: bool = False
) -> RGB:
    """Paint a map [h, w] with a matplotlib colour map, upsampled to ``size`` (height, width).

    Nearest-neighbour upsampling keeps one flat block per patch, as DINO's figures do. Unless
    ``normalised``, the map is first min-max scaled to [0, 1].
    """
    values = as_float(values)
    if values.ndim != 2:
        raise ValueError(f"expected a map [h, w], got shape {values.shape}")
    scaled = np.clip(values, 0.0, 1.0) if normalised else normalise(values)
    rgba = matplotlib.colormaps[cmap](scaled)
    return resize(to_uint8(rgba[..., :3]), size, nearest=True)


def overlay_mask(image: ArrayLike, mask: ArrayLike, alpha: float = 0.5) -> RGB:
    """Tint the image where a patch mask [h, w] is set and darken the rest."""
    image = _as_rgb(image)
    mask = np.asarray(mask, dtype=np.float64)
    if mask.ndim != 2:
        raise ValueError(f"expected a mask [h, w], got shape {mask.shape}")
    full = resize(to_uint8(mask), image.shape[:2], nearest=True)[..., None] / 255.0
    base = image.astype(np.float64)
    tinted = (1 - alpha) * base + alpha * MASK_COLOUR
    out = full * tinted + (1 - full) * base * 0.35
    return np.clip(out, 0, 255).astype(np.uint8)


def blend(image: ArrayLike, heat: ArrayLike, alpha: float = 0.6) -> RGB:
    """Alpha-blend a painted map over an image of the same size."""
    image, heat = _as_rgb(image), _as_rgb(heat)
    if image.shape != heat.shape:
        raise ValueError(f"image {image.shape} and map {heat.shape} differ in size")
    out = (1 - alpha) * image.astype(np.float64) + alpha * heat.astype(np.float64)
    return np.clip(out, 0, 255).astype(np.uint8)


def draw_marker(image: ArrayLike, point: tuple[float, float], radius: int | None = None) -> RGB:
    """A cross-hair at reference point (x, y) in [-1, 1] on a copy of the image."""
    image = _as_rgb(image).copy()
    height, width = image.shape[:2]
    radius = radius or max(4, min(height, width) // 40)
    x = round((point[0] + 1) / 2 * width - 0.5)
    y = round((point[1] + 1) / 2 * height - 0.5)
    x, y = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
    thick = max(1, radius // 4)
    image[max(y - thick, 0) : y + thick + 1, max(x - radius, 0) : x + radius + 1] = MARKER_COLOUR
    image[max(y - radius, 0) : y + radius + 1, max(x - thick, 0) : x + thick + 1] = MARKER_COLOUR
    return image


def resize(image: ArrayLike, size: tuple[int, int], nearest: bool = False) -> RGB:
    """Resize a uint8 image [h, w] or [h, w, C] to ``size`` (height, width)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.shape[:2] == tuple(size):
        return image.copy()
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    return np.array(Image.fromarray(image).resize((size[1], size[0]), method))


def caption(image: ArrayLike, text: str, size: int = 14) -> RGB:
    """A copy of the image with ``text`` on a white box in its bottom-left corner."""
    out = Image.fromarray(_as_rgb(image))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=size)
    left, _, right, bottom = draw.textbbox((0, 0), text, font=font)
    box_height = bottom + 6  # text box from the origin, plus a 3-px margin above and below
    y = out.height - box_height
    draw.rectangle((0, y, right - left + 8, out.height), fill=(255, 255, 255))
    draw.text((4, y + 3), text, fill=(0, 0, 0), font=font)
    return np.array(out)


def tile(images: Sequence[ArrayLike], columns: int, gap: int = 4) -> RGB:
    """Equally sized RGB images laid out row by row, ``columns`` wide, with white gaps."""
    if not images:
        raise ValueError("no images to tile")
    if columns < 1:
        raise ValueError(f"columns must be positive, got {columns}")
    tiles = [_as_rgb(im) for im in images]
    height, width = tiles[0].shape[:2]
    if any(t.shape != tiles[0].shape for t in tiles):
        raise ValueError("images to tile must share one shape")
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    out = np.full(
        (rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8
    )
    for k, t in enumerate(tiles):
        top, left = (k // columns) * (height + gap), (k % columns) * (width + gap)
        out[top : top + height, left : left + width] = t
    return out


# -------------------------------------------------------------------------------- conversions
def as_float(values: ArrayLike) -> FloatArray:
    """A float NumPy array from an array-like or a (CPU or GPU) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()  # type: ignore[union-attr]
    array = np.asarray(values)
    return array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float32)


def to_uint8(values: ArrayLike) -> RGB:
    """Values in [0, 1] -> uint8 in [0, 255] (clipped, rounded)."""
    return np.clip(np.rint(np.asarray(values) * 255.0), 0, 255).astype(np.uint8)


def _as_rgb(image: ArrayLike) -> RGB:
    """The image itself, checked to be uint8 RGB [H, W, 3]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    return image

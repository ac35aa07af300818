"""Procedural multi-object scenes: the built-in dataset of the demo and of the tests.

A scene is a textured background with 2-4 objects of distinct classes painted on top of each
other. The class of an object is its *shape*; size, position and (where the shape allows it)
rotation are random nuisances. Colour and texture depend on the `appearance`:

- ``"class"`` (the built-in data of the demo): an object wears its class's colour family and
  texture with probability ``CLASS_STYLE_P``, random ones otherwise, on a quiet near-grey
  background. As with categories in
  photographs, appearance is a typical but unreliable cue and shape is the one that always holds;
  it is what lets a few CPU minutes of self-supervised pretraining learn features that separate
  the classes.
- ``"random"``: colour and texture are drawn independently of the class, so shape is the only
  cue (a harder setting; a few CPU minutes of pretraining do not learn it).

The mask is exact: it is painted with the same boolean regions, in the same order, as the image.

Everything is vectorised numpy on the full pixel grid (no per-pixel Python loops) and fully
determined by the random generator passed in, so one (seed, index) pair gives one scene.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np

from densedino.data.constants import voc_palette

# Alphabetical on purpose: torchvision's ImageFolder sorts class folders by name, so the folder
# index order equals the order of CLASSES and label i means CLASSES[i] in both layouts
# (in the masks the same class is i + 1, since 0 is the background).
CLASSES: tuple[str, ...] = (
    "circle",
    "crescent",
    "cross",
    "diamond",
    "heart",
    "hexagon",
    "ring",
    "square",
    "star",
    "triangle",
)
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255

MIN_IMAGE_SIZE = 32
MIN_OBJECTS, MAX_OBJECTS = 2, 4
# Object half-extent as a fraction of the image side: the labelled (largest) object is drawn
# bigger than the others so that it usually wins the visible-area vote without many retries.
MAIN_SIZE = (0.22, 0.34)
OTHER_SIZE = (0.13, 0.25)
# Each object must keep this fraction of its own area visible, so occlusion never hides a class
# down to a few stray pixels.
MIN_VISIBLE_FRACTION = 0.45
MIN_COLOUR_DISTANCE = 60.0
MAX_SCENE_ATTEMPTS = 40
PIXEL_NOISE_STD = 4.0
Appearance = Literal["class", "random"]
APPEARANCES: tuple[str, ...] = ("class", "random")
# appearance="class": probability that an object wears its class's style, and the spread of its
# hue around the class's (classes are 0.1 apart on the hue circle).
CLASS_STYLE_P = 0.75
CLASS_HUE_STD = 0.03

Grid = tuple[np.ndarray, np.ndarray]


# Background followed by the foreground classes, in mask-index order.
PALETTE: tuple[tuple[int, int, int], ...] = tuple(voc_palette(NUM_CLASSES + 1))


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image `index` of a dataset drawn with `seed` (independent of workers)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index,)))


# ----------------------------------------------------------------------------------- shapes
# Each shape is a region in local unit coordinates (u to the right, v downwards, half-extent ~1),
# returned as a boolean array over the pixel grid.


def _polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every (u, v) against a closed polygon."""
    inside = np.zeros(u.shape, dtype=bool)
    count = len(vertices)
    for i in range(count):
        x1, y1 = vertices[i]
        x2, y2 = vertices[i - 1]
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at_v = (x2 - x1) * (v - y1) / (y2 - y1) + x1
        inside ^= crosses & (u < x_at_v)
    return inside


def _regular_polygon(count: int, radius: float, start_angle: float) -> np.ndarray:
    angles = start_angle + 2 * np.pi * np.arange(count) / count
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star_vertices(points: int = 5, outer: float = 1.12, inner: float = 0.46) -> np.ndarray:
    angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_TRIANGLE = _regular_polygon(3, 1.15, -np.pi / 2)
_HEXAGON = _regular_polygon(6, 0.98, 0.0)
_STAR = _star_vertices()


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 0.9**2


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    outer = u * u + v * v <= 1.0
    bite = (u - 0.5) ** 2 + v * v <= 0.78**2
    return outer & ~bite


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # An upright rhombus, taller than wide, so it never looks like a rotated square.
    return np.abs(u) / 0.66 + np.abs(v) / 1.1 <= 1.0


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x = 1.2 * u
    y = -1.2 * v + 0.25  # the implicit curve has y upwards; the grid has v downwards
    base = x * x + y * y - 1.0
    return base * base * base - x * x * y * y * y <= 0.0


def _hexagon(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _polygon(u, v, _HEXAGON)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    radius2 = u * u + v * v
    return (radius2 <= 1.0) & (radius2 >= 0.56**2)


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _polygon(u, v, _STAR)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _polygon(u, v, _TRIANGLE + np.array([0.0, 0.2]))  # centre the area, not the vertices


ShapeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

# shape function and maximum rotation in degrees: shapes whose identity depends on being upright
# (square vs diamond, plus sign, heart) only get a small tilt.
SHAPES: dict[str, tuple[ShapeFn, float]] = {
    "circle": (_circle, 0.0),
    "crescent": (_crescent, 180.0),
    "cross": (_cross, 20.0),
    "diamond": (_diamond, 15.0),
    "heart": (_heart, 20.0),
    "hexagon": (_hexagon, 30.0),
    "ring": (_ring, 0.0),
    "square": (_square, 15.0),
    "star": (_star, 36.0),
    "triangle": (_triangle, 180.0),
}


def shape_region(
    class_index: int,
    grid: Grid,
    centre: tuple[float, float],
    half_extent: float,
    angle_deg: float,
) -> np.ndarray:
    """Boolean region of one shape of class `class_index` (0-based) placed on the pixel grid."""
    shape_fn, _ = SHAPES[CLASSES[class_index]]
    ys, xs = grid
    theta = np.deg2rad(angle_deg)
    dx, dy = xs - centre[0], ys - centre[1]
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / half_extent
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / half_extent
    return shape_fn(u, v)


# --------------------------------------------------------------------------------- textures
# A texture colours a set of pixels given by their (ys, xs) coordinates, of any shape: the whole
# grid for the background, only the pixels of its region for an object (cheaper). It returns
# float32 colours (0..255) of shape (*ys.shape, 3). Periods are in pixels of a 128 px image and
# scale with `size`, so a scene looks the same at any resolution.


def _object_colour(rng: np.random.Generator) -> np.ndarray:
    hue, sat, val = rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0


def _background_colour(rng: np.random.Generator) -> np.ndarray:
    hue, sat, val = rng.random(), rng.uniform(0.0, 0.45), rng.uniform(0.15, 0.95)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0


def _rotated_coordinates(rng: np.random.Generator, points: Grid) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = points
    theta = rng.uniform(0.0, np.pi)
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    return xs * cos + ys * sin, -xs * sin + ys * cos


def _blend(weight: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    weight = weight.astype(np.float32)[..., None]
    return first + weight * (second - first)


def _smooth_noise(rng: np.random.Generator, points: Grid, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random (cells+1)^2 lattice over the image, bilinearly sampled."""
    lattice = rng.random((cells + 1, cells + 1)).astype(np.float32)
    ys, xs = (coord * np.float32(cells / size) for coord in points)
    row = np.minimum(ys.astype(np.int64), cells - 1)
    col = np.minimum(xs.astype(np.int64), cells - 1)
    fy, fx = ys - row, xs - col
    top = lattice[row, col] * (1 - fx) + lattice[row, col + 1] * fx
    bottom = lattice[row + 1, col] * (1 - fx) + lattice[row + 1, col + 1] * fx
    return top * (1 - fy) + bottom * fy


def _solid(rng, points: Grid, size: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.broadcast_to(first, (*points[0].shape, 3)).astype(np.float32)


def _stripes(rng, points: Grid, size: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    along, _ = _rotated_coordinates(rng, points)
    period = rng.uniform(5.0, 14.0) * size / 128
    return _blend((along / period + rng.random()) % 1.0 < 0.5, first, second)


def _checker(rng, points: Grid, size: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    along, across = _rotated_coordinates(rng, points)
    period = rng.uniform(5.0, 12.0) * size / 128
    parity = (np.floor(along / period) + np.floor(across / period)) % 2
    return _blend(parity, first, second)


def _dots(rng, points: Grid, size: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    along, across = _rotated_coordinates(rng, points)
    period = rng.uniform(6.0, 12.0) * size / 128
    fu, fv = (along / period) % 1.0 - 0.5, (across / period) % 1.0 - 0.5
    return _blend(fu * fu + fv * fv < rng.uniform(0.06, 0.16), first, second)


def _noise(rng, points: Grid, size: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    cells = int(rng.integers(3, 12))
    return _blend(_smooth_noise(rng, points, size, cells), first, second)


def _gradient(rng, points: Grid, size: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    along, _ = _rotated_coordinates(rng, points)
    low, high = along.min(), along.max()
    return _blend((along - low) / max(high - low, 1e-6), first, second)


TextureFn = Callable[[np.random.Generator, Grid, int, np.ndarray, np.ndarray], np.ndarray]
OBJECT_TEXTURES: dict[str, TextureFn] = {
    "solid": _solid,
    "stripes": _stripes,
    "checker": _checker,
    "dots": _dots,
    "noise": _noise,
}
BACKGROUND_TEXTURES: dict[str, TextureFn] = {
    "gradient": _gradient,
    "noise": _noise,
    "stripes": _stripes,
    "checker": _checker,
}


def _pick(rng: np.random.Generator, table: dict[str, TextureFn]) -> TextureFn:
    return list(table.values())[int(rng.integers(len(table)))]


# appearance="class": near-grey backgrounds without stripes or checks, so that the objects, not
# the background, are what tells two scenes apart.
QUIET_BACKGROUND_TEXTURES: dict[str, TextureFn] = {"gradient": _gradient, "noise": _noise}


def _quiet_background_colour(rng: np.random.Generator) -> np.ndarray:
    hue, sat, val = rng.random(), rng.uniform(0.0, 0.12), rng.uniform(0.55, 0.9)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, grid: Grid, appearance: Appearance) -> np.ndarray:
    """HxWx3 float32 background texture."""
    quiet = appearance == "class"
    first = _quiet_background_colour(rng) if quiet else _background_colour(rng)
    # Low contrast so the background reads as texture, not as extra objects.
    second = np.clip(first + rng.normal(0.0, 35.0, size=3), 0, 255).astype(np.float32)
    table = QUIET_BACKGROUND_TEXTURES if quiet else BACKGROUND_TEXTURES
    return _pick(rng, table)(rng, grid, grid[0].shape[0], first, second)


def _object_colours(
    rng: np.random.Generator, grid: Grid, region: np.ndarray, background_mean: np.ndarray
) -> np.ndarray:
    """Nx3 colours of the N pixels of `region`, whose mean stands apart from the background."""
    points = (grid[0][region], grid[1][region])
    colours = np.zeros((0, 3), dtype=np.float32)
    for _ in range(10):
        first, second = _object_colour(rng), _object_colour(rng)
        colours = _pick(rng, OBJECT_TEXTURES)(rng, points, grid[0].shape[0], first, second)
        if np.linalg.norm(colours.mean(axis=0) - background_mean) >= MIN_COLOUR_DISTANCE:
            break
    return colours


def class_style(class_index: int) -> tuple[float, str]:
    """Hue (in [0, 1)) and object texture typical of a class under appearance="class"; classes
    sharing a texture are half the hue circle apart."""
    textures = tuple(OBJECT_TEXTURES)
    return class_index / NUM_CLASSES, textures[class_index % len(textures)]


def _class_colours(
    rng: np.random.Generator, grid: Grid, region: np.ndarray, class_index: int
) -> np.ndarray:
    """Nx3 colours of `region` in the class's texture, a saturated colour of its hue family over
    a darker shade of it (saturated colours stand apart from the pale backgrounds)."""
    hue, texture = class_style(class_index)
    hue = (hue + rng.normal(0.0, CLASS_HUE_STD)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    first = np.array(rgb, dtype=np.float32) * 255.0
    second = first * np.float32(rng.uniform(0.35, 0.6))
    points = (grid[0][region], grid[1][region])
    return OBJECT_TEXTURES[texture](rng, points, grid[0].shape[0], first, second)


# ------------------------------------------------------------------------------------ scene


def _place_regions(
    rng: np.random.Generator, grid: Grid, classes: list[int], main_class: int
) -> list[np.ndarray]:
    """One region per class, the main class drawn larger; positions keep objects mostly inside."""
    size = grid[0].shape[0]
    regions = []
    for class_index in classes:
        low, high = MAIN_SIZE if class_index == main_class else OTHER_SIZE
        half_extent = rng.uniform(low, high) * size
        margin = 0.7 * half_extent
        centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
        max_angle = SHAPES[CLASSES[class_index]][1]
        angle = rng.uniform(-max_angle, max_angle)
        regions.append(shape_region(class_index, grid, centre, half_extent, angle))
    return regions


def _paint_mask(regions: list[np.ndarray], classes: list[int], size: int) -> np.ndarray:
    """Mask painted in order (later objects over earlier ones); values are class index + 1."""
    mask = np.zeros((size, size), dtype=np.uint8)
    for region, class_index in zip(regions, classes, strict=True):
        mask[region] = class_index + 1
    return mask


def _is_valid_scene(
    mask: np.ndarray, regions: list[np.ndarray], classes: list[int], main_class: int
) -> bool:
    """Every object stays visible enough and the main class has the largest visible area."""
    visible = np.bincount(mask.ravel(), minlength=NUM_CLASSES + 1)
    min_pixels = 0.01 * mask.size
    for region, class_index in zip(regions, classes, strict=True):
        shown = visible[class_index + 1]
        if shown < min_pixels or shown < MIN_VISIBLE_FRACTION * region.sum():
            return False
    others = [visible[c + 1] for c in classes if c != main_class]
    return all(visible[main_class + 1] > count for count in others)


class Layout(NamedTuple):
    """Objects of a scene in painting order, and the mask they paint."""

    classes: list[int]  # 0-based, distinct
    regions: list[np.ndarray]  # boolean HxW region of each object before occlusion
    mask: np.ndarray  # uint8 HxW, 0 = background, class + 1 where the object is visible


def compose_layout(rng: np.random.Generator, image_size: int, main_class: int) -> Layout:
    """Draw classes, sizes and positions until the scene is valid (see `_is_valid_scene`)."""
    grid = pixel_grid(image_size)
    others = [c for c in range(NUM_CLASSES) if c != main_class]
    for _ in range(MAX_SCENE_ATTEMPTS):
        count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        classes = [main_class, *rng.choice(others, size=count - 1, replace=False).tolist()]
        classes = [classes[i] for i in rng.permutation(count)]  # painting order
        regions = _place_regions(rng, grid, classes, main_class)
        mask = _paint_mask(regions, classes, image_size)
        if _is_valid_scene(mask, regions, classes, main_class):
            return Layout(classes, regions, mask)
    # Practically unreachable; a lone main object is always a valid scene.
    regions = _place_regions(rng, grid, [main_class], main_class)
    return Layout([main_class], regions, _paint_mask(regions, [main_class], image_size))


def pixel_grid(image_size: int) -> Grid:
    """(ys, xs) coordinates of the pixel centres, each HxW float32."""
    coords = np.arange(image_size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    return ys, xs


def render_scene(
    rng: np.random.Generator | int,
    image_size: int = 128,
    label: int | None = None,
    appearance: Appearance = "class",
) -> tuple[np.ndarray, np.ndarray, int]:
    """Render one scene.

    Args:
        rng: a numpy Generator, or an int seed for a fresh one.
        image_size: side of the square image in pixels (>= 32).
        label: 0-based class that must end up with the largest visible area; random if None.
        appearance: ``"class"`` or ``"random"`` colours and textures (see the module docstring).

    Returns:
        image (uint8, HxWx3 RGB), mask (uint8, HxW; 0 background, 1..C = CLASSES[value - 1]),
        label (0-based index into CLASSES of the class with the largest visible area).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(f"image_size must be an int, got {image_size!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if label is not None and not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES - 1}] or None, got {label}")
    if appearance not in APPEARANCES:
        raise ValueError(f"appearance must be one of {APPEARANCES}, got {appearance!r}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    main_class = int(rng.integers(NUM_CLASSES)) if label is None else int(label)

    layout = compose_layout(rng, image_size, main_class)

    grid = pixel_grid(image_size)
    image = _background(rng, grid, appearance)
    background_mean = image.reshape(-1, 3).mean(axis=0)
    for region, class_index in zip(layout.regions, layout.classes, strict=True):  # painting order
        if appearance == "class" and rng.random() < CLASS_STYLE_P:
            image[region] = _class_colours(rng, grid, region, class_index)
        else:
            image[region] = _object_colours(rng, grid, region, background_mean)
    image += PIXEL_NOISE_STD * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), layout.mask, main_class


def boundary_band(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Pixels whose (2r+1)x(2r+1) neighbourhood holds more than one label (VOC-style border)."""
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    padded = np.pad(mask, radius, mode="edge")
    height, width = mask.shape
    low = mask.copy()
    high = mask.copy()
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            window = padded[dy : dy + height, dx : dx + width]
            np.minimum(low, window, out=low)
            np.maximum(high, window, out=high)
    return low != high


def with_ignore_border(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Copy of `mask` with IGNORE_INDEX on the boundary band, as in VOC's SegmentationClass."""
    out = mask.copy()
    out[boundary_band(mask, radius)] = IGNORE_INDEX
    return out

"""Tests of the multi-view augmentation: geometry, reference points, overlap bound, pixels."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from densedino.data.collate import collate_views
from densedino.data.crops import intersection_area, sample_view_boxes
from densedino.data.photometric import adjust_hue, gaussian_blur
from densedino.data.reference_points import pair_mask
from densedino.data.view_config import ViewConfig
from densedino.data.views import MultiViewTransform

HEIGHT, WIDTH = 192, 256


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """One intra-op thread, as in a data-loader worker: on a busy 2-core machine, OpenMP threads
    waiting for each other make these small per-view ops up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _coordinate_image() -> torch.Tensor:
    """uint8 [3, 192, 256] whose red channel is the column and green channel the row."""
    ys, xs = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    return torch.stack([xs, ys, torch.full_like(xs, 128)]).to(torch.uint8)


def _decode(view: torch.Tensor, points: torch.Tensor, cfg: ViewConfig) -> torch.Tensor:
    """Original-image location [K, 2] (continuous pixels) read from a coordinate-image view."""
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    raw = (view * std + mean) * 255.0
    sampled = F.grid_sample(
        raw[None, :2],
        points[None, None],
        mode="bilinear",
        align_corners=False,
        padding_mode="border",
    )
    # Pixel i holds value i and covers [i, i + 1): its centre is at i + 0.5.
    return sampled[0, :, 0].T + 0.5


def _location(points: torch.Tensor, box: torch.Tensor, flipped: bool) -> torch.Tensor:
    """Original-image location [K, 2] of normalised view points, from the view's box."""
    q = points.clone()
    if flipped:
        q[:, 0] = -q[:, 0]
    return box[:2] + (q + 1) / 2 * (box[2:] - box[:2])


def _check_points(cfg: ViewConfig, samples: int, seed: int) -> int:
    """Decode every defined pair of ``samples`` outputs; return the number of pairs checked."""
    transform = MultiViewTransform(cfg)
    generator = torch.Generator().manual_seed(seed)
    image = _coordinate_image()
    checked = 0
    for _ in range(samples):
        out = transform(image, generator)
        boxes, flips, points = out["boxes"], out["flips"], out["points"]
        for a, b in itertools.permutations(range(cfg.num_views), 2):
            if not pair_mask(cfg.num_views, cfg.num_teacher)[a, b]:
                continue
            loc = _location(points[a, b], boxes[a], bool(flips[a]))
            # Same image locations from both frames (pure geometry).
            torch.testing.assert_close(
                _location(points[b, a], boxes[b], bool(flips[b])), loc, atol=1e-3, rtol=0
            )
            # Inside the overlap box of the two crops.
            lo = torch.maximum(boxes[a, :2], boxes[b, :2])
            hi = torch.minimum(boxes[a, 2:], boxes[b, 2:])
            assert bool(((loc >= lo - 1e-3) & (loc <= hi + 1e-3)).all())
            # The pixels of both views at their points show that location.
            for view, pts in ((out["views"][a], points[a, b]), (out["views"][b], points[b, a])):
                error = (_decode(view, pts, cfg) - loc).abs().max().item()
                assert error <= 1.0, f"pair ({a}, {b}): decoded location off by {error:.2f} px"
            checked += 1
    return checked


@pytest.mark.parametrize("point_mode", ["random", "grid"])
@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_points_decode_same_image_location(point_mode: str, flip_p: float) -> None:
    cfg = ViewConfig(
        num_global=3,
        num_teacher=2,
        num_local=3,
        photometric=False,
        flip_p=flip_p,
        point_mode=point_mode,
        # 3 random points, or the 3 x 3 grid.
        **({"grid_side": 3} if point_mode == "grid" else {"num_points": 3}),
        global_scale=(0.3, 1.0),
    )
    assert _check_points(cfg, samples=4, seed=1) == 4 * (2 * 5 + 2 * 4)


def test_flip_p_forces_flips() -> None:
    image = _coordinate_image()
    for flip_p, expected in ((0.0, False), (1.0, True)):
        out = MultiViewTransform(ViewConfig(num_local=2, photometric=False, flip_p=flip_p))(image)
        assert bool((out["flips"] == expected).all())
    # A flipped view's red (column) channel decreases from left to right.
    out = MultiViewTransform(ViewConfig(photometric=False, flip_p=1.0))(image)
    red = out["views"][0][0]
    assert bool((red[:, 0] > red[:, -1]).all())


def test_shapes_dtypes_and_nan_pattern() -> None:
    cfg = ViewConfig(
        num_global=3,
        num_teacher=2,
        num_local=2,
        global_size=64,
        local_size=32,
        point_mode="grid",
        grid_side=3,
    )
    out = MultiViewTransform(cfg)(_coordinate_image(), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in out["views"]] == [(3, 64, 64)] * 3 + [(3, 32, 32)] * 2
    assert all(v.dtype == torch.float32 for v in out["views"])
    assert out["boxes"].shape == (5, 4) and out["boxes"].dtype == torch.float32
    assert out["flips"].shape == (5,) and out["flips"].dtype == torch.bool
    points = out["points"]
    assert points.shape == (5, 5, 9, 2) and points.dtype == torch.float32
    defined = ~torch.isnan(points).any(dim=-1).any(dim=-1)
    expected = torch.tensor(
        [
            [0, 1, 1, 1, 1],
            [1, 0, 1, 1, 1],
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(defined, expected)
    assert torch.equal(pair_mask(5, 2), expected)
    # Undefined pairs are NaN in every coordinate, defined ones finite and inside [-1, 1].
    assert bool(torch.isnan(points[~expected]).all())
    assert bool((points[expected].abs() <= 1.0).all())
    assert int(out["num_fallbacks"]) == 0


def test_grid_points_are_cell_centres_of_overlap() -> None:
    cfg = ViewConfig(num_local=1, photometric=False, flip_p=0.0, point_mode="grid", grid_side=2)
    out = MultiViewTransform(cfg)(_coordinate_image(), torch.Generator().manual_seed(3))
    boxes = out["boxes"]
    lo = torch.maximum(boxes[0, :2], boxes[2, :2])
    hi = torch.minimum(boxes[0, 2:], boxes[2, 2:])
    u = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    torch.testing.assert_close(_location(out["points"][0, 2], boxes[0], False), lo + u * (hi - lo))


def test_random_points_same_u_on_both_sides() -> None:
    cfg = ViewConfig(num_local=2, photometric=False, num_points=5)
    out = MultiViewTransform(cfg)(_coordinate_image(), torch.Generator().manual_seed(4))
    boxes, flips, points = out["boxes"], out["flips"], out["points"]
    lo = torch.maximum(boxes[0, :2], boxes[3, :2])
    hi = torch.minimum(boxes[0, 2:], boxes[3, 2:])
    u_a = (_location(points[0, 3], boxes[0], bool(flips[0])) - lo) / (hi - lo)
    u_b = (_location(points[3, 0], boxes[3], bool(flips[3])) - lo) / (hi - lo)
    torch.testing.assert_close(u_a, u_b, atol=1e-4, rtol=0)
    assert bool(((u_a >= 0) & (u_a < 1)).all())
    assert u_a.unique().numel() == 10  # random, not a grid


def _assert_bound(boxes: torch.Tensor, cfg: ViewConfig, area: float) -> None:
    """Every crop overlaps each earlier global crop by more than the configured bound."""
    for i in range(1, cfg.num_views):
        bound = cfg.min_intersection_global if i < cfg.num_global else cfg.min_intersection
        for g in range(min(i, cfg.num_global)):
            inter = float(intersection_area(boxes[i], boxes[g]))
            assert inter > bound * area, f"crops {g} and {i}: {inter / area:.4f} <= {bound}"


@pytest.mark.parametrize("size", [(192, 256), (500, 375), (300, 300)])
def test_overlap_bound_holds_over_many_samples(size: tuple[int, int]) -> None:
    height, width = size
    area = float(height * width)
    # Bounds high enough that unconstrained crops often violate them.
    cfg = ViewConfig(num_global=3, num_local=6, min_intersection=0.08, min_intersection_global=0.3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        boxes, fallbacks = sample_view_boxes(cfg, height, width, generator)
        assert fallbacks == 0
        _assert_bound(boxes, cfg, area)
        assert bool(
            (boxes[:, :2] >= 0).all()
            & (boxes[:, 2] <= width).all()
            & (boxes[:, 3] <= height).all()
            & (boxes[:, 2:] > boxes[:, :2]).all()
        )
        assert torch.equal(boxes, boxes.round())
    # The same bounds without re-sampling would be violated: the test above can fail.
    free = ViewConfig(num_global=3, num_local=6, min_intersection=0.0, min_intersection_global=0.0)
    violations = 0
    for _ in range(100):
        boxes, _ = sample_view_boxes(free, height, width, generator)
        try:
            _assert_bound(boxes, cfg, area)
        except AssertionError:
            violations += 1
    assert violations > 10


def test_crop_scale_follows_config() -> None:
    cfg = ViewConfig.dino(num_local=8)
    generator = torch.Generator().manual_seed(0)
    areas = torch.cat(
        [
            intersection_area(b, b)[None]
            for b in (sample_view_boxes(cfg, 375, 500, generator)[0] for _ in range(100))
        ]
    ) / (375 * 500)
    globals_, locals_ = areas[:, :2], areas[:, 2:]
    # Rounding of the crop sides moves the area fraction by well under 1 %.
    assert 0.39 <= float(globals_.min()) and float(globals_.max()) <= 1.0
    assert 0.045 <= float(locals_.min()) and float(locals_.max()) <= 0.41


def test_fallback_with_impossible_bound() -> None:
    # Crops of at most 10 % of the image can never overlap another by 50 %.
    cfg = ViewConfig(
        num_global=2,
        num_local=2,
        global_scale=(0.05, 0.1),
        local_scale=(0.05, 0.1),
        min_intersection=0.5,
        min_intersection_global=0.5,
        max_tries=5,
        photometric=False,
    )
    transform = MultiViewTransform(cfg)
    generator = torch.Generator().manual_seed(0)
    for call in range(1, 4):
        out = transform(_coordinate_image(), generator)
        boxes = out["boxes"]
        # Global 2 falls back to the box enclosing global 1, i.e. global 1 itself; the locals
        # to the box enclosing both globals, again global 1.
        for i in range(1, 4):
            assert torch.equal(boxes[i], boxes[0])
        assert int(out["num_fallbacks"]) == 3
        assert transform.num_fallbacks == 3 * call
        assert not torch.isnan(out["points"][pair_mask(4, 2)]).any()


def test_fallback_meets_bound_when_any_box_can() -> None:
    # Small locals cannot overlap big globals by 30 %; the enclosing box of the globals can.
    cfg = ViewConfig(
        num_global=2,
        num_local=3,
        global_scale=(0.6, 1.0),
        local_scale=(0.05, 0.1),
        min_intersection=0.3,
        max_tries=7,
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        boxes, fallbacks = sample_view_boxes(cfg, HEIGHT, WIDTH, generator)
        assert fallbacks == 3
        expected = torch.cat([boxes[:2, :2].amin(0), boxes[:2, 2:].amax(0)])
        assert bool((boxes[2:] == expected).all())
        _assert_bound(boxes, cfg, float(HEIGHT * WIDTH))


def _pil_view(image: Image.Image, box: list[int], size: int, flipped: bool) -> torch.Tensor:
    """uint8 [3, size, size]: DINO's PIL way to one view (crop the box, bicubic resize, which
    PIL antialiases when it shrinks, then mirror)."""
    view = image.crop(tuple(box)).resize((size, size), Image.Resampling.BICUBIC)
    if flipped:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(view)).permute(2, 0, 1)


def test_view_is_crop_and_resize_of_its_box() -> None:
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 150, 200), dtype=torch.uint8, generator=generator)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    cfg = ViewConfig(num_local=3, global_size=64, local_size=32, photometric=False)
    transform = MultiViewTransform(cfg)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    one_level = 1 / 255 / float(std.min())  # a grey level, normalised
    seen_flips = set()
    for _ in range(5):
        out = transform(image, generator)
        for v, view in enumerate(out["views"]):
            box = [int(c) for c in out["boxes"][v]]
            flipped = bool(out["flips"][v])
            expected = _pil_view(pil, box, cfg.view_sizes[v], flipped)
            error = (view - (expected.float() / 255 - mean) / std).abs()
            # torchvision's uint8 antialiased bicubic and PIL's round a few pixels (< 1 %, in
            # the last place) the other way; a shifted box or mirror misses most pixels.
            assert float(error.max()) <= one_level + 1e-5
            assert float((error <= 1e-5).float().mean()) >= 0.98
            seen_flips.add(flipped)
    assert seen_flips == {False, True}


def test_pil_and_tensor_inputs_agree() -> None:
    image = torch.randint(
        0, 256, (3, 120, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    transform = MultiViewTransform(ViewConfig(num_local=2, global_size=64, local_size=32))
    from_tensor = transform(image, torch.Generator().manual_seed(5))
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    from_pil = transform(pil, torch.Generator().manual_seed(5))
    for a, b in zip(from_tensor["views"], from_pil["views"], strict=True):
        torch.testing.assert_close(a, b)
    # Grayscale inputs are accepted as 3 identical channels.
    gray = transform(pil.convert("L"), torch.Generator().manual_seed(5))
    assert gray["views"][0].shape == (3, 64, 64)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 10, 10),  # float
        torch.zeros(4, 10, 10, dtype=torch.uint8),
        torch.zeros(10, 10, dtype=torch.uint8),
        torch.zeros(3, 0, 10, dtype=torch.uint8),
    ],
)
def test_invalid_images_raise(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="image"):
        MultiViewTransform(ViewConfig())(bad)


def test_determinism_with_seeded_generator() -> None:
    image = torch.randint(
        0, 256, (3, 120, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    transform = MultiViewTransform(ViewConfig(num_local=3, global_size=64, local_size=32))
    first = transform(image, torch.Generator().manual_seed(7))
    second = transform(image, torch.Generator().manual_seed(7))
    other = transform(image, torch.Generator().manual_seed(8))
    for key in ("boxes", "flips"):
        assert torch.equal(first[key], second[key])
    torch.testing.assert_close(first["points"], second["points"], equal_nan=True)
    for a, b in zip(first["views"], second["views"], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first["boxes"], other["boxes"])
    # Without a generator, torch's global RNG is used (and seeding it reproduces).
    torch.manual_seed(11)
    third = transform(image)
    torch.manual_seed(11)
    fourth = transform(image)
    assert torch.equal(third["boxes"], fourth["boxes"])
    assert torch.equal(third["views"][0], fourth["views"][0])


def test_photometric_changes_pixels_not_geometry() -> None:
    image = torch.randint(
        0, 256, (3, 120, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    plain = MultiViewTransform(
        ViewConfig(num_local=2, global_size=64, local_size=32, photometric=False)
    )
    jittered = MultiViewTransform(ViewConfig(num_local=2, global_size=64, local_size=32))
    a = plain(image, torch.Generator().manual_seed(2))
    b = jittered(image, torch.Generator().manual_seed(2))
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["flips"], b["flips"])
    # Global view 1 is always blurred (p = 1), so it always differs.
    assert not torch.allclose(a["views"][0], b["views"][0])


def test_grayscale_p_one_makes_every_view_grey() -> None:
    image = torch.randint(
        0, 256, (3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    cfg = ViewConfig(num_local=2, global_size=48, local_size=32, grayscale_p=1.0, hue=0.5)
    out = MultiViewTransform(cfg)(image, torch.Generator().manual_seed(1))
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    for view in out["views"]:
        pixels = view * std + mean
        torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(pixels[1], pixels[2], atol=1e-5, rtol=0)
    coloured = MultiViewTransform(ViewConfig(num_local=2, global_size=48, local_size=32))
    first = coloured(image, torch.Generator().manual_seed(1))["views"][0] * std + mean
    assert (first[0] - first[1]).abs().max() > 0.05  # the check above can fail


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.3, 2.0])
def test_gaussian_blur_matches_torchvision(sigma: float) -> None:
    img = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0))
    size = 2 * int(torch.tensor(3 * sigma).ceil()) + 1
    expected = TF.gaussian_blur(img, [size, size], [sigma, sigma])
    torch.testing.assert_close(gaussian_blur(img, sigma), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [-0.5, -0.1, 0.0, 0.03, 0.1, 0.5])
def test_adjust_hue_matches_torchvision(shift: float) -> None:
    img = torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(0))
    img[:, :5, :5] = 0.3  # grey: no hue
    img[0, 10:15] = img[1, 10:15]  # ties between maximal channels
    img[2, 20:25] = img[1, 20:25]
    img = (img * 255).round() / 255
    torch.testing.assert_close(adjust_hue(img, shift), TF.adjust_hue(img, shift), atol=1e-5, rtol=0)


def test_collate_views() -> None:
    cfg = ViewConfig(num_local=2, global_size=64, local_size=32, num_points=3)
    transform = MultiViewTransform(cfg)
    image = _coordinate_image()
    samples = []
    for i in range(3):
        sample = transform(image, torch.Generator().manual_seed(i))
        sample.update(label=i, index=torch.tensor(10 + i), path=f"img{i}.jpg")
        samples.append(sample)
    batch = collate_views(samples)
    assert [tuple(v.shape) for v in batch["views"]] == [(3, 3, 64, 64)] * 2 + [(3, 3, 32, 32)] * 2
    assert batch["points"].shape == (3, 4, 4, 3, 2)
    assert batch["boxes"].shape == (3, 4, 4) and batch["flips"].shape == (3, 4)
    assert batch["label"].tolist() == [0, 1, 2] and batch["index"].tolist() == [10, 11, 12]
    assert batch["num_fallbacks"].shape == (3,)
    assert batch["path"] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert torch.equal(batch["views"][1][2], samples[2]["views"][1])
    with pytest.raises(ValueError, match="keys"):
        collate_views([samples[0], {"views": samples[1]["views"]}])
    with pytest.raises(ValueError, match="at least one"):
        collate_views([])


def test_presets() -> None:
    dino = ViewConfig.dino()
    assert dino.view_sizes == (224,) * 2 + (96,) * 8 and dino.num_teacher == 2
    assert dino.global_scale == (0.4, 1.0) and dino.local_scale == (0.05, 0.4)
    assert ViewConfig.dino(num_local=2).num_views == 4
    paper = ViewConfig.paper()
    assert paper.view_sizes == (224,) * 4 and paper.num_teacher == 2
    assert paper.points_per_pair == 4 and paper.point_mode == "random"
    authors = ViewConfig.authors()
    assert authors.view_sizes == (224,) * 6 and authors.num_teacher == 2
    assert authors.global_scale == authors.local_scale == (0.25, 1.0)
    # --num_reference 2 in random mode: 2 random points per pair (main_dino.py's
    # sampling_reference_point; only grid mode draws k x k).
    assert authors.points_per_pair == 2 and authors.point_mode == "random"
    assert ViewConfig(point_mode="grid", grid_side=3).points_per_pair == 9
    out = MultiViewTransform(ViewConfig.paper())(_coordinate_image())
    assert out["points"].shape == (4, 4, 4, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_global": 0}, "num_global"),
        ({"num_local": -1}, "num_local"),
        ({"num_teacher": 3}, "num_teacher"),
        ({"num_teacher": 0}, "num_teacher"),
        ({"global_size": 0}, "global_size"),
        ({"num_points": 0}, "num_points"),
        ({"max_tries": 0}, "max_tries"),
        ({"global_scale": (0.5, 0.4)}, "global_scale"),
        ({"local_scale": (0.0, 0.4)}, "local_scale"),
        ({"global_scale": (0.4, 1.2)}, "global_scale"),
        ({"global_scale": (0.4,)}, "global_scale"),
        ({"ratio": (4 / 3, 3 / 4)}, "ratio"),
        ({"point_mode": "lattice"}, "point_mode"),
        ({"point_mode": "grid"}, "grid_side"),
        ({"point_mode": "grid", "grid_side": 0}, "grid_side"),
        ({"point_mode": "grid", "num_points": 3}, "grid_side"),  # not K x K: say grid_side
        ({"grid_side": 3}, "grid_side"),  # random mode counts num_points
        ({"min_intersection": 1.0}, "min_intersection"),
        ({"min_intersection_global": -0.1}, "min_intersection_global"),
        ({"flip_p": 1.5}, "flip_p"),
        ({"grayscale_p": -0.1}, "grayscale_p"),
        ({"hue": 0.6}, "hue"),
        ({"std": (0.2, 0.2, 0.0)}, "std"),
        ({"mean": (0.5, 0.5)}, "mean"),
    ],
)
def test_invalid_configs_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ViewConfig(**kwargs)


def test_config_lists_become_tuples() -> None:
    cfg = ViewConfig(global_scale=[0.3, 1.0], mean=[0.5, 0.5, 0.5])  # type: ignore[arg-type]
    assert cfg.global_scale == (0.3, 1.0) and cfg.mean == (0.5, 0.5, 0.5)
    hash(cfg)


def test_views_are_contiguous_even_without_resize() -> None:
    # A full-image crop of the view's own size skips the resize and keeps the input's strides.
    cfg = ViewConfig(
        num_global=1,
        num_teacher=1,
        global_size=64,
        global_scale=(1.0, 1.0),
        photometric=False,
        flip_p=0.0,
    )
    image = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).permute(2, 0, 1)
    view = MultiViewTransform(cfg)(image)["views"][0]
    assert view.shape == (3, 64, 64) and view.is_contiguous()


def test_uint8_views_are_the_float_views_before_normalisation() -> None:
    from densedino.data.collate import normalize_views

    image = _coordinate_image()
    for photometric in (False, True):
        cfg = ViewConfig(num_local=2, global_size=48, local_size=32, photometric=photometric)
        floats = MultiViewTransform(cfg)(image, torch.Generator().manual_seed(5))
        ints = MultiViewTransform(cfg, dtype="uint8")(image, torch.Generator().manual_seed(5))
        assert all(v.dtype == torch.uint8 and v.is_contiguous() for v in ints["views"])
        for key in ("boxes", "flips", "points"):
            torch.testing.assert_close(ints[key], floats[key], equal_nan=True)
        batch = normalize_views(collate_views([ints]))
        assert "pixel_norm" not in batch
        std = torch.tensor(cfg.std).view(3, 1, 1)
        # Rounding to uint8 at the end moves a pixel by at most half a grey level.
        bound = 1e-5 if not photometric else 0.5 / 255 / float(std.min()) + 1e-5
        for ours, theirs in zip(batch["views"], floats["views"], strict=True):
            assert ours.dtype == torch.float32
            assert (ours[0] - theirs).abs().max() <= bound


def test_normalize_views_errors_and_float_passthrough() -> None:
    from densedino.data.collate import normalize_views

    floats = {"views": [torch.zeros(1, 3, 4, 4)]}
    assert normalize_views(floats) is floats
    with pytest.raises(ValueError, match="pixel_norm"):
        normalize_views({"views": [torch.zeros(1, 3, 4, 4, dtype=torch.uint8)]})
    with pytest.raises(ValueError, match="dtype"):
        MultiViewTransform(ViewConfig(), dtype="float16")  # type: ignore[arg-type]

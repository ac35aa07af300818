"""Position embeddings at other view sizes, from the formulas (DINO's convention, timm's option).

DINO and the DenseDINO authors (``interpolate_pos_encoding``) resize the native g x g patch grid
to h x w with bicubic ``F.interpolate(scale_factor=((h + 0.1) / g, (w + 0.1) / g))``, no
antialias. With a scale factor s the output cell j reads the input at

    src(j) = (j + 0.5) / s - 0.5 = (j + 0.5) * g / (side + 0.1) - 0.5

with Keys' cubic convolution (a = -0.75) over the taps floor(src) - 1 .. floor(src) + 2, tap
indices clamped to the grid. The oracle below writes exactly that out in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from densedino.models.vit import VisionTransformer

SIZES = [(96, 96), (160, 160), (288, 288), (448, 448), (224, 160), (160, 288)]


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the taps at distances 1 + t, t, 1 - t, 2 - t."""

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def resize_axis(grid: np.ndarray, out: int, axis: int) -> np.ndarray:
    """Bicubic resize of one axis of ``grid`` to ``out`` cells with DINO's scale factor."""
    size = grid.shape[axis]
    scale = (out + 0.1) / size
    moved = np.moveaxis(grid, axis, 0)
    result = np.zeros((out, *moved.shape[1:]))
    for j in range(out):
        src = (j + 0.5) / scale - 0.5
        base = math.floor(src)
        for tap, weight in zip(range(base - 1, base + 3), cubic_weights(src - base), strict=True):
            result[j] += weight * moved[min(max(tap, 0), size - 1)]
    return np.moveaxis(result, 0, axis)


def model(pos_interp: str = "dino", **kw: object) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=224,
        patch_size=16,
        embed_dim=192,
        depth=1,
        num_heads=3,
        pos_interp=pos_interp,
        **kw,
    )  # type: ignore[arg-type]
    return vit.eval().double()


def patch_centres(gh: int, gw: int, offset: float = 0.0) -> torch.Tensor:
    """Points (x, y) at the centres of an gh x gw patch grid, in [-1, 1], row-major [1, N, 2].

    With ``offset`` the centres are computed as if the grid had ``side + offset`` cells.
    """
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    xs, ys = (2 * cols + 1) / (gw + offset) - 1, (2 * rows + 1) / (gh + offset) - 1
    return torch.stack([xs, ys], dim=-1).reshape(1, gh * gw, 2).double()


@pytest.mark.parametrize(("height", "width"), SIZES)
@torch.no_grad()
def test_dino_interpolation_equals_the_formula(height, width):
    vit = model()
    gh, gw = height // 16, width // 16
    grid = vit.patch_pos_grid()[0].numpy()  # [D, 14, 14]
    expected = resize_axis(resize_axis(grid, gh, axis=1), gw, axis=2)
    expected = torch.from_numpy(expected).flatten(1).T
    torch.testing.assert_close(vit.patch_pos_embed((gh, gw))[0], expected, atol=1e-7, rtol=0)
    # DINO's own call, in float32 as it runs in training.
    dino = torch.nn.functional.interpolate(
        vit.patch_pos_grid().float(),
        scale_factor=((gh + 0.1) / 14, (gw + 0.1) / 14),
        mode="bicubic",
        align_corners=False,
    )
    ours = vit.float().patch_pos_embed((gh, gw))[0]
    torch.testing.assert_close(ours, dino.flatten(2)[0].T, atol=1e-6, rtol=0)


@torch.no_grad()
def test_native_size_uses_the_grid_as_it_is():
    for interp in ("dino", "timm"):
        vit = model(interp)
        torch.testing.assert_close(vit.patch_pos_embed((14, 14)), vit.pos_embed[:, 1:])


@pytest.mark.parametrize(("height", "width"), SIZES)
@torch.no_grad()
def test_dino_patch_carries_the_native_grid_at_a_shifted_point(height, width):
    """Under DINO's convention, patch (i, j) of an h x w grid holds the native grid's value at
    x = (2j + 1) / (w + 0.1) - 1, y = (2i + 1) / (h + 0.1) - 1, which is where a reference token
    (bicubic point sample of the native grid, border padding = clamped taps) reads it. A token
    at the patch centre (2j + 1) / w - 1 is therefore off by (2j + 1) (1 / w - 1 / (w + 0.1))."""
    vit = model(ref_padding="border")
    gh, gw = height // 16, width // 16
    tokens = vit.reference_pos_embed(patch_centres(gh, gw, offset=0.1))[0]
    torch.testing.assert_close(tokens, vit.patch_pos_embed((gh, gw))[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("height", "width"), [(96, 96), (160, 160), (224, 160)])
@torch.no_grad()
def test_reference_token_at_patch_centre_off_the_native_size(height, width):
    """How close a reference token at a patch centre comes to that patch's embedding: exact at
    the native size under both options; elsewhere neither option gives the point sample (DINO's
    shifts the sample points by the + 0.1, timm's filters with an antialiased a = -0.5 kernel);
    the README lists the measured distances."""
    gh, gw = height // 16, width // 16
    for interp in ("dino", "timm"):
        vit = model(interp)
        native = vit.reference_pos_embed(patch_centres(14, 14))[0]
        torch.testing.assert_close(native, vit.patch_pos_embed((14, 14))[0], atol=1e-6, rtol=0)
        tokens = vit.reference_pos_embed(patch_centres(gh, gw))[0]
        assert (tokens - vit.patch_pos_embed((gh, gw))[0]).abs().max() > 1e-3


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="pos_interp"):
        model("nearest")

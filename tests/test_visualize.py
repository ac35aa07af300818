"""Pictures of the demo: selection, DINO masks, PCA colours, reference maps, painting."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from densedino.models.vit import build_backbone
from densedino.serve import visualize as vis
from densedino.serve.demo import Explorer, fit_size, load_model
from densedino.weights import save_backbone


# ---------------------------------------------------------------------------- mass threshold
def brute_force_count(weights: np.ndarray, threshold: float) -> int:
    """The fewest cells whose sum reaches ``threshold`` of the total (largest first)."""
    ranked = np.sort(weights.ravel())[::-1]
    goal = threshold * ranked.sum()
    for k in range(1, ranked.size + 1):
        if ranked[:k].sum() >= goal:
            return k
    raise AssertionError("unreachable: all cells hold the whole mass")


@pytest.mark.parametrize("threshold", [0.1, 0.35, 0.6, 0.9, 1.0])
def test_mass_threshold_keeps_the_fewest_patches_reaching_the_mass(threshold: float) -> None:
    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.full(7 * 9, 0.3), size=4).reshape(4, 7, 9)  # peaky, like attention
    masks = vis.mass_threshold_masks(maps, threshold)
    assert masks.shape == maps.shape and masks.dtype == bool
    for weights, mask in zip(maps, masks, strict=True):
        assert weights[mask].sum() >= threshold * weights.sum() - 1e-12
        assert mask.sum() == brute_force_count(weights, threshold)
        # The kept cells are the largest ones: nothing dropped outweighs anything kept.
        if (~mask).any():
            assert weights[~mask].max() <= weights[mask].min()


def test_mass_threshold_matches_dinos_formula() -> None:
    """DINO's visualize_attention.py: ascending sort, keep where cumsum > 1 - threshold."""
    maps = np.random.default_rng(8).dirichlet(np.ones(50), size=6)
    order = np.argsort(maps, axis=-1)
    cumulative = np.cumsum(np.take_along_axis(maps, order, axis=-1), axis=-1)
    dino = np.zeros_like(maps, dtype=bool)
    np.put_along_axis(dino, order, cumulative > 1 - 0.6, axis=-1)
    assert (vis.mass_threshold_masks(maps.reshape(6, 5, 10), 0.6).reshape(6, 50) == dino).all()


def test_mass_threshold_constructed_cases() -> None:
    weights = np.array([[0.1, 0.5], [0.1, 0.3]])
    assert vis.mass_threshold_masks(weights, 0.6).tolist() == [[False, True], [False, True]]
    # Reaching the goal exactly is enough: 0.5 holds half of the mass.
    assert vis.mass_threshold_masks(weights, 0.5).tolist() == [[False, True], [False, False]]
    assert vis.mass_threshold_masks(weights, 1.0).all()
    # Zero cells are never needed, even for the whole mass; an empty map keeps nothing.
    sparse = np.array([[0.0, 2.0], [0.0, 2.0]])
    assert vis.mass_threshold_masks(sparse, 1.0).tolist() == [[False, True], [False, True]]
    assert not vis.mass_threshold_masks(np.zeros((3, 3)), 0.6).any()
    # Unnormalised maps behave as their normalised versions.
    assert (
        vis.mass_threshold_masks(weights * 37, 0.6) == vis.mass_threshold_masks(weights, 0.6)
    ).all()


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_mass_threshold_rejects_bad_thresholds(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        vis.mass_threshold_masks(np.ones((2, 2)), threshold)


def test_mass_threshold_rejects_negative_weights() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        vis.mass_threshold_masks(np.array([[1.0, -0.5]]), 0.6)


# ------------------------------------------------------------------------------------- PCA
def test_pca_rgb_shape_range_and_full_scale() -> None:
    features = np.random.default_rng(1).normal(size=(5, 6, 32)).astype(np.float32)
    rgb = vis.pca_rgb(features)
    assert rgb.shape == (5, 6, 3)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    # Every component is stretched over the whole [0, 1] range.
    assert np.allclose(rgb.reshape(-1, 3).min(axis=0), 0.0)
    assert np.allclose(rgb.reshape(-1, 3).max(axis=0), 1.0)


def test_pca_rgb_first_component_separates_the_dominant_direction() -> None:
    rng = np.random.default_rng(2)
    direction = rng.normal(size=16)
    side = np.where(np.arange(8) < 4, 1.0, -1.0)  # left half +, right half -
    features = side[None, :, None] * 5 * direction + 0.1 * rng.normal(size=(6, 8, 16))
    red = vis.pca_rgb(features)[..., 0]
    left, right = red[:, :4], red[:, 4:]
    assert (np.abs(left - left.mean()) < 0.1).all() and (np.abs(right - right.mean()) < 0.1).all()
    assert abs(left.mean() - right.mean()) > 0.8


def test_pca_rgb_ignores_offset_and_scale_and_greys_missing_components() -> None:
    features = torch.randn(4, 4, 10, generator=torch.Generator().manual_seed(3))
    rgb = vis.pca_rgb(features)  # torch tensors are accepted too
    assert np.allclose(vis.pca_rgb(3 * features + torch.arange(10.0)), rgb, atol=1e-5)
    flat = vis.pca_rgb(np.random.default_rng(4).normal(size=(3, 3, 2)))  # only 2 components
    assert np.allclose(flat[..., 2], 0.5)
    assert np.allclose(vis.pca_rgb(np.ones((2, 2, 5))), 0.5)


# ------------------------------------------------------------------------- reference maps
def test_cosine_similarity_peaks_at_the_matching_patch() -> None:
    patches = np.random.default_rng(5).normal(size=(6, 7, 24))
    sim = vis.cosine_similarity_map(patches[4, 2] * 3.0, patches)
    assert sim.shape == (6, 7)
    assert np.unravel_index(sim.argmax(), sim.shape) == (4, 2)
    assert sim[4, 2] == pytest.approx(1.0)
    assert sim.min() >= -1 - 1e-9 and np.sort(sim.ravel())[-2] < 0.9


def test_click_points_and_patches_round_trip() -> None:
    assert vis.click_to_ref_point(0, 0, 4, 2) == (-0.75, -0.5)
    assert vis.click_to_ref_point(3, 1, 4, 2) == (0.75, 0.5)
    # Patch centres of a 3x5 grid map back onto their patch.
    for row, col in itertools.product(range(3), range(5)):
        centre = ((2 * col + 1) / 5 - 1, (2 * row + 1) / 3 - 1)
        assert vis.ref_point_to_patch(centre, (3, 5)) == (row, col)
    assert vis.ref_point_to_patch((1.0, 1.0), (3, 5)) == (2, 4)
    with pytest.raises(ValueError, match="outside"):
        vis.click_to_ref_point(4, 0, 4, 2)


def test_attention_rows_are_taken_from_the_right_tokens() -> None:
    grid, num_refs, heads = (2, 3), 2, 4
    length = 1 + num_refs + 6
    attn = np.arange(heads * length * length, dtype=np.float64).reshape(heads, length, length)
    cls = vis.cls_attention(attn, grid)
    assert cls.shape == (heads, 2, 3)
    assert (cls == attn[:, 0, 3:].reshape(heads, 2, 3)).all()
    ref = vis.reference_attention(attn, grid, ref=1)
    assert (ref == attn[:, 2, 3:].reshape(heads, 2, 3)).all()
    with pytest.raises(ValueError, match="reference token 2"):
        vis.reference_attention(attn, grid, ref=2)
    with pytest.raises(ValueError, match="reference token 0"):
        vis.reference_attention(attn[:, 2:, 2:], grid)  # no reference token at all


def identity_block_model(img_size: int) -> torch.nn.Module:
    """A 1-block tiny ViT whose patch embedding and residual branches output zero.

    Every token then leaves the model as LayerNorm(its position embedding), so a reference
    token placed on a patch centre ends up equal to that patch's output.
    """
    model = build_backbone("vit_tiny", 16, depth=1, img_size=img_size)
    with torch.no_grad():
        for layer in (model.patch_embed.proj, model.blocks[0].attn.proj, model.blocks[0].mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
    return model.eval()


def test_explorer_reference_maps_at_a_clicked_patch_centre() -> None:
    # A 60x60 photo shown to a 64-px model: 4x4 patches of 15 source pixels each.
    explorer = Explorer(identity_block_model(64), image_size=64)
    picture = np.random.default_rng(6).integers(0, 256, size=(60, 60, 3), dtype=np.uint8)
    image = explorer.prepare(picture)
    assert image.shape == (64, 64, 3)
    row, col = 1, 2
    point = vis.click_to_ref_point(col * 15 + 7, row * 15 + 7, 60, 60)  # centre pixel
    assert point == ((2 * col + 1) / 4 - 1, (2 * row + 1) / 4 - 1)
    attention, similarity = explorer.reference(image, point)
    assert attention.shape == (3, 4, 4) and similarity.shape == (4, 4)
    assert np.unravel_index(similarity.argmax(), similarity.shape) == (row, col)
    assert similarity[row, col] == pytest.approx(1.0, abs=1e-4)
    assert np.sort(similarity.ravel())[-2] < 0.9
    # The reference's key equals its patch's key, so its self-attention (not over patches)
    # equals its attention to that patch: per head the patch row sums to 1 minus that weight.
    assert np.allclose(attention.sum(axis=(1, 2)) + attention[:, row, col], 1.0, atol=1e-5)


def test_explorer_analyse_shapes_and_attention_mass() -> None:
    explorer = Explorer(build_backbone("vit_tiny", 16, depth=2), image_size=96)
    picture = np.random.default_rng(7).integers(0, 256, size=(50, 100), dtype=np.uint8)  # grey
    analysis, patches = explorer.analyse(picture)
    assert analysis.image.shape == (48, 96, 3) and analysis.source_size == (50, 100)
    assert analysis.cls_maps.shape == (3, 3, 6) and patches.shape == (3, 6, 192)
    # CLS attends to itself and the patches: the patch part of its row is below 1.
    sums = analysis.cls_maps.sum(axis=(1, 2))
    assert ((sums > 0) & (sums < 1)).all()


def test_random_weights_are_seeded_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first, _ = load_model(None, "vit_tiny")
    assert torch.rand(1) == expected
    second, label = load_model(None, "vit_tiny")
    assert torch.equal(first.pos_embed, second.pos_embed)
    assert "RANDOM WEIGHTS" in label and "vit_tiny/16" in label


def test_load_model_from_a_checkpoint_names_it(tmp_path: Path) -> None:
    saved = build_backbone("vit_tiny", 16, depth=2)
    path = save_backbone(saved, tmp_path / "backbone.safetensors")
    model, label = load_model(path)
    assert torch.equal(model.pos_embed, saved.pos_embed)
    assert "backbone.safetensors" in label and "vit_tiny/16" in label
    assert "RANDOM" not in label


def test_demo_cli_reports_a_missing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from densedino.serve.demo_cli import main

    assert main(["--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert "no checkpoint file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(512, 512, (448, 448)), (300, 451, (304, 448)), (1000, 10, (448, 16)), (8, 8, (448, 448))],
)
def test_fit_size(height: int, width: int, expected: tuple[int, int]) -> None:
    assert fit_size(height, width, 448, 16) == expected


# -------------------------------------------------------------------------------- painting
def test_colorize_paints_one_flat_block_per_patch() -> None:
    values = np.array([[0.0, 1.0], [0.5, 0.25]])
    image = vis.colorize(values, (32, 48))
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8
    block = image[:16, :24]
    assert (block == block[0, 0]).all()
    assert not (image[0, 0] == image[0, -1]).all()
    assert vis.colorize(np.full((2, 2), 3.0), (4, 4)).shape == (4, 4, 3)  # constant map


def test_overlay_mask_tints_kept_patches_and_darkens_the_rest() -> None:
    image = np.full((4, 6, 3), 200, dtype=np.uint8)
    out = vis.overlay_mask(image, np.array([[True, False, False], [False, False, True]]))
    assert out.shape == image.shape
    kept = np.zeros((4, 6), dtype=bool)
    kept[:2, :2] = kept[2:, 4:] = True
    assert (out[kept] == out[0, 0]).all() and (out[~kept] == out[0, 2]).all()
    assert (out[0, 0] != out[0, 2]).any() and (out[~kept] < 200).all()


def test_draw_marker_hits_the_point_and_blend_checks_sizes() -> None:
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    marked = vis.draw_marker(image, vis.click_to_ref_point(10, 30, 40, 40))
    assert tuple(marked[30, 10]) == vis.MARKER_COLOUR
    assert not image.any(), "the input stays untouched"
    with pytest.raises(ValueError, match="differ"):
        vis.blend(image, np.zeros((20, 40, 3), dtype=np.uint8))


def test_tile_lays_out_rows_and_caption_marks_the_corner() -> None:
    tiles = [np.full((3, 5, 3), k, dtype=np.uint8) for k in range(5)]
    grid = vis.tile(tiles, columns=3, gap=2)
    assert grid.shape == (2 * 3 + 2, 3 * 5 + 2 * 2, 3)
    assert (grid[:3, 7:12] == 1).all() and (grid[5:, 7:12] == 4).all()
    assert (grid[5:, 14:] == 255).all(), "the missing sixth tile stays white"
    assert (grid[3:5] == 255).all()
    with pytest.raises(ValueError, match="share one shape"):
        vis.tile([tiles[0], np.zeros((4, 5, 3), dtype=np.uint8)], columns=2)
    image = np.zeros((60, 120, 3), dtype=np.uint8)
    labelled = vis.caption(image, "head 7")
    assert labelled[-1, 0].tolist() == [255, 255, 255] and not labelled[:20].any()

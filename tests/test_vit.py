"""ViT backbone: reference tokens leave CLS/patch outputs untouched, masks, attention, layers."""

from __future__ import annotations

import pytest
import torch

from densedino.models.vit import (
    VisionTransformer,
    build_backbone,
    reference_attention_mask,
)

ATOL = 1e-5


def tiny(
    patch_size: int = 16, img_size: int = 64, depth: int = 3, **kw: object
) -> VisionTransformer:
    """A small ViT-Tiny (few blocks, small learned grid) in eval mode, fixed seed."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=192, depth=depth, num_heads=3, **kw
    )  # type: ignore[arg-type]
    return model.eval()


def random_points(batch: int, num: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num, 2, generator=gen) * 2 - 1


def images(batch: int, height: int, width: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("patch_size", "height", "width", "kw"),
    [
        (16, 64, 64, {}),
        (16, 64, 96, {}),  # non-square: resized position grid
        (8, 48, 64, {}),
        (16, 64, 64, {"ref_content": "learnable", "ref_padding": "border"}),
    ],
)
@torch.no_grad()
def test_reference_tokens_do_not_change_cls_and_patch(patch_size, height, width, kw):
    model = tiny(patch_size, **kw)
    x = images(2, height, width)
    plain = model.forward_features(x)
    with_refs = model.forward_features(x, random_points(2, 6))
    grid = (height // patch_size, width // patch_size)
    assert plain.keys() == {"cls", "patch"}
    assert with_refs["patch"].shape == (2, *grid, 192)
    assert with_refs["ref"].shape == (2, 6, 192)
    torch.testing.assert_close(with_refs["cls"], plain["cls"], atol=ATOL, rtol=0)
    torch.testing.assert_close(with_refs["patch"], plain["patch"], atol=ATOL, rtol=0)
    torch.testing.assert_close(model(x), plain["cls"])


@torch.no_grad()
def test_reference_output_depends_only_on_its_own_point():
    model = tiny(img_size=64)
    x = images(2, 64, 96)
    points = random_points(2, 5)
    base = model.forward_features(x, points)["ref"]

    others_moved = points.clone()
    others_moved[:, 1:] = random_points(2, 4, seed=7)
    moved = model.forward_features(x, others_moved)["ref"]
    torch.testing.assert_close(moved[:, 0], base[:, 0], atol=ATOL, rtol=0)

    alone = model.forward_features(x, points[:, 2:3])["ref"]
    torch.testing.assert_close(alone[:, 0], base[:, 2], atol=ATOL, rtol=0)

    own_moved = points.clone()
    own_moved[:, 0] = -own_moved[:, 0]
    changed = model.forward_features(x, own_moved)["ref"]
    assert (changed[:, 0] - base[:, 0]).abs().max() > 1e-2
    torch.testing.assert_close(changed[:, 1:], base[:, 1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("ref_content", ["zero", "learnable"])
@torch.no_grad()
def test_reference_position_at_patch_centre_is_that_patch_embedding(ref_content):
    model = tiny(img_size=80, ref_content=ref_content)  # 5 x 5 learned grid
    gh, gw = model.grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    # align_corners=False: the centre of patch i lies at (2i + 1) / g - 1; points are (x, y).
    xs, ys = (2 * cols + 1) / gw - 1, (2 * rows + 1) / gh - 1
    points = torch.stack([xs, ys], dim=-1).reshape(1, gh * gw, 2)
    tokens = model.reference_tokens(points)[0]
    expected = model.pos_embed[0, 1:]  # row-major patch order
    if ref_content == "learnable":
        expected = expected + model.ref_token[0]
    torch.testing.assert_close(tokens, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_reference_padding_mode_is_honoured():
    points = torch.tensor([[[1.0, 0.0], [-1.0, -1.0]]])  # beyond the outer patch centres
    values = {}
    for padding in ("zeros", "border"):
        model = tiny(img_size=80, ref_padding=padding)
        model.pos_embed.fill_(1.0)
        values[padding] = model.reference_pos_embed(points)
    torch.testing.assert_close(values["border"], torch.ones(1, 2, 192))
    assert (values["zeros"] - 1).abs().min() > 1e-3


def test_reference_attention_mask_semantics():
    num_refs, num_patches = 3, 4
    mask = reference_attention_mask(num_refs, num_patches)
    length = 1 + num_refs + num_patches
    assert mask.shape == (length, length) and mask.dtype == torch.bool
    refs = set(range(1, 1 + num_refs))
    for q in range(length):
        for k in range(length):
            if k in refs:
                allowed = q == k
            elif q in refs:
                allowed = k != 0
            else:
                allowed = True
            assert bool(mask[q, k]) == allowed, (q, k)


@torch.no_grad()
def test_last_selfattention_masked_rows():
    model = tiny()
    x = images(2, 64, 96)
    num_refs = 4
    attn = model.get_last_selfattention(x, random_points(2, num_refs))
    length = 1 + num_refs + 4 * 6
    assert attn.shape == (2, 3, length, length)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, length))
    refs = slice(1, 1 + num_refs)
    others = [0, *range(1 + num_refs, length)]
    assert attn[:, :, others, refs].abs().max() == 0
    ref_rows = attn[:, :, refs]
    assert ref_rows[..., 0].abs().max() == 0
    diag = torch.diagonal(ref_rows[..., refs], dim1=-2, dim2=-1)
    assert (diag > 0).all()
    assert ref_rows[..., refs].sum(-1).sub(diag).abs().max() == 0
    # CLS/patch rows are the plain model's attention.
    plain = model.get_last_selfattention(x)
    torch.testing.assert_close(attn[:, :, others][..., others], plain, atol=ATOL, rtol=0)


def masked_oracle(
    model: VisionTransformer, x: torch.Tensor, points: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The authors' formulation written out: one sequence [CLS | REF | PATCH], the additive
    mask of ``reference_attention_mask`` in every block, explicit softmax attention.

    Returns the final-norm features and the last block's attention [B, heads, L, L].
    """
    patches = model.patch_embed(x)
    batch, gh, gw, dim = patches.shape
    pos = model.patch_pos_embed((gh, gw))
    cls = model.cls_token + model.pos_embed[:, :1]
    seq = torch.cat(
        [cls.expand(batch, -1, -1), model.reference_tokens(points), patches.flatten(1, 2) + pos], 1
    )
    num_refs, length = points.shape[1], seq.shape[1]
    bias = torch.zeros(length, length).masked_fill(
        ~reference_attention_mask(num_refs, gh * gw), float("-inf")
    )
    heads = model.num_heads
    for block in model.blocks:
        qkv = block.attn.qkv(block.norm1(seq)).reshape(batch, length, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5 + bias).softmax(-1)
        seq = seq + block.attn.proj((attn @ v).transpose(1, 2).reshape(batch, length, dim))
        seq = seq + block.mlp(block.norm2(seq))
    out = model.norm(seq)
    features = {
        "cls": out[:, 0],
        "ref": out[:, 1 : 1 + num_refs],
        "patch": out[:, 1 + num_refs :].reshape(batch, gh, gw, dim),
    }
    return features, attn


@pytest.mark.parametrize(
    ("patch_size", "height", "width", "kw"),
    [
        (16, 64, 64, {}),
        (16, 96, 64, {}),
        (8, 48, 64, {"ref_content": "learnable", "ref_padding": "border"}),
        (16, 48, 80, {"pos_interp": "timm"}),
    ],
)
@torch.no_grad()
def test_cross_attention_equals_masked_formulation(patch_size, height, width, kw):
    model = tiny(patch_size, **kw)
    x, points = images(2, height, width), random_points(2, 5)
    expected, expected_attn = masked_oracle(model, x, points)
    out = model.forward_features(x, points)
    for key in ("cls", "patch", "ref"):
        torch.testing.assert_close(out[key], expected[key], atol=ATOL, rtol=0)
    attn = model.get_last_selfattention(x, points)
    torch.testing.assert_close(attn, expected_attn, atol=1e-6, rtol=0)


def test_cross_attention_gradients_equal_masked_formulation():
    model = tiny(depth=2, ref_content="learnable")
    x, points = images(2, 64, 80), random_points(2, 4)
    weights = torch.randn(192, generator=torch.Generator().manual_seed(3))

    def grads(features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        model.zero_grad()
        loss = sum((features[k] * weights).square().mean() for k in ("cls", "patch", "ref"))
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    ours = grads(model.forward_features(x, points))
    oracle = grads(masked_oracle(model, x, points)[0])
    for a, b in zip(ours, oracle, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_drop_path_draw_is_shared_by_references_and_patches():
    """Under stochastic depth a sample's draw covers all its tokens, as in one masked sequence:
    with the same seed, CLS and patches come out as without references."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=64, patch_size=16, embed_dim=192, depth=4, num_heads=3, drop_path_rate=0.5
    ).train()
    x, points = images(8, 64, 64), random_points(8, 3)
    torch.manual_seed(5)
    plain = model.forward_features(x)
    torch.manual_seed(5)
    with_refs = model.forward_features(x, points)
    torch.testing.assert_close(with_refs["cls"], plain["cls"], atol=ATOL, rtol=0)
    torch.testing.assert_close(with_refs["patch"], plain["patch"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.5, -1.01])
def test_bad_reference_points_are_refused(bad):
    model = tiny()
    points = random_points(1, 3)
    points[0, 1, 0] = bad
    with pytest.raises(ValueError, match=r"finite and inside \[-1, 1\]"):
        model.forward_features(images(1, 64, 64), points)
    edge = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])  # the view's corners are allowed
    assert model.forward_features(images(1, 64, 64), edge)["ref"].isfinite().all()


@torch.no_grad()
def test_cls_attention_maps():
    model = tiny()
    x = images(2, 64, 96)
    maps = model.cls_attention_maps(x)
    assert maps.shape == (2, 3, 4, 6)
    attn = model.get_last_selfattention(x)
    torch.testing.assert_close(maps.flatten(2), attn[:, :, 0, 1:])


@torch.no_grad()
def test_intermediate_layers():
    model = tiny(depth=3)
    x = images(1, 64, 64)
    last = model.get_intermediate_layers(x, n=1)
    assert len(last) == 1
    final = model.forward_features(x)
    torch.testing.assert_close(last[0]["cls"], final["cls"])
    torch.testing.assert_close(last[0]["patch"], final["patch"])
    two = model.get_intermediate_layers(x, n=2)
    assert len(two) == 2
    torch.testing.assert_close(two[1]["cls"], final["cls"])
    by_index = model.get_intermediate_layers(x, n=[0, -1], norm=False)
    assert len(by_index) == 2 and by_index[0]["patch"].shape == (1, 4, 4, 192)
    torch.testing.assert_close(model.norm(by_index[1]["cls"]), final["cls"])
    assert not torch.allclose(by_index[0]["cls"], two[0]["cls"])
    with pytest.raises(ValueError, match="block indices"):
        model.get_intermediate_layers(x, n=[3])
    with pytest.raises(ValueError, match="n must be"):
        model.get_intermediate_layers(x, n=0)


def test_reference_gradients_reach_position_grid_and_token():
    model = tiny(depth=2, ref_content="learnable")
    out = model.forward_features(images(1, 64, 64), random_points(1, 2))
    out["ref"].square().sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad[0, 1:].abs().sum() > 0
    assert model.ref_token is not None and model.ref_token.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("arch", "dim", "heads"), [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)]
)
def test_build_backbone_archs(arch, dim, heads):
    model = build_backbone(arch, patch_size=8, depth=1)
    assert (model.embed_dim, model.num_heads, model.patch_size, model.depth) == (dim, heads, 8, 1)
    assert model.pos_embed.shape == (1, 1 + 28 * 28, dim)
    assert model.blocks[0].attn.qkv.bias is not None
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6
    assert "ref_token" not in model.state_dict()
    assert build_backbone("vit_tiny").depth == 12


def test_build_backbone_errors_and_drop_path():
    with pytest.raises(ValueError, match="vit_small"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="patch_size"):
        build_backbone("vit_tiny", patch_size=14)
    model = build_backbone("vit_tiny", depth=3, drop_path_rate=0.2)
    rates = [block.drop_path1.drop_prob for block in model.blocks[1:]]
    assert rates == pytest.approx([0.1, 0.2])
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 3, 64, 70))
    with pytest.raises(ValueError, match="ref_points"):
        model.forward_features(torch.zeros(1, 3, 64, 64), torch.zeros(2, 3, 2))

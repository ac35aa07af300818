"""SelfPatch: neighbourhoods (wrapped as the authors' get_local_index, or masked), top-k by
cosine, the class-attention aggregate against a plain loop, the patch loss by hand, the method's
wiring (teacher aggregates, same view, L_dino + 0.1 L_patch) and a short CLI run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_runs import assert_export_evaluates, logged, mean, run, small_run_config
from tiny import TINY_SELFPATCH

from densedino.data.collate import collate_views
from densedino.data.view_config import ViewConfig
from densedino.data.views import MultiViewTransform
from densedino.losses import PatchLoss
from densedino.methods import SelfPatch
from densedino.methods.base import StepState
from densedino.methods.selfpatch import (
    PatchAggregator,
    backbone_views,
    neighbour_index,
    select_neighbours,
)


@pytest.fixture(scope="module")
def batch() -> dict:
    """2 global 32 px views (4 x 4 patches) + 2 local 24 px views (3 x 3 patches)."""
    views = ViewConfig(
        num_global=2, global_size=32, num_local=2, local_size=24, num_points=1, photometric=False
    )
    generator = torch.Generator().manual_seed(0)
    transform = MultiViewTransform(views)
    images = torch.randint(0, 256, (3, 3, 48, 64), dtype=torch.uint8, generator=generator)
    return collate_views([transform(img, generator=generator) for img in images])


def neighbour_sets(height: int, width: int, border: str) -> list[set[int]]:
    index, valid = neighbour_index(height, width, border)
    return [set(index[p][valid[p]].tolist()) for p in range(height * width)]


# ------------------------------------------------------------------------------ neighbours
def authors_local_index(num_patches: int, k_size: int = 3) -> list[set[int]]:
    """SelfPatchHead.get_local_index (alinlab/SelfPatch) written plainly: the (k_size x
    k_size) window of patch i, indices taken modulo the side, patch i itself left out."""
    side = int(math.sqrt(num_patches))
    out = []
    for i in range(num_patches):
        ix, iy = i // side, i % side
        rows = {(ix + j) % side for j in range(-(k_size // 2), k_size // 2 + 1)}
        cols = {(iy + j) % side for j in range(-(k_size // 2), k_size // 2 + 1)}
        out.append({r * side + c for r in rows for c in cols} - {i})
    return out


@pytest.mark.parametrize("side", [3, 4, 6, 14])
def test_wrap_neighbours_equal_the_authors_index(side: int) -> None:
    assert neighbour_sets(side, side, "wrap") == authors_local_index(side * side)


def test_wrap_border_pinned_on_a_4x4_grid() -> None:
    sets = neighbour_sets(4, 4, "wrap")
    # Corner (0, 0): 3 in-image neighbours + 5 from the opposite edges (row 3, column 3).
    assert sets[0] == {1, 4, 5} | {3, 7, 12, 13, 15}
    # Edge (0, 1): 5 in-image neighbours + 3 from the bottom row.
    assert sets[1] == {0, 2, 4, 5, 6} | {12, 13, 14}
    assert all(len(s) == 8 for s in sets)
    # A non-square grid wraps each axis by its own size.
    assert neighbour_sets(3, 5, "wrap")[0] == {1, 4, 5, 6, 9, 10, 11, 14}


def test_mask_border_keeps_in_image_neighbours_only() -> None:
    index, valid = neighbour_index(4, 4, "mask")
    sets = neighbour_sets(4, 4, "mask")
    assert sets[0] == {1, 4, 5}  # corner: 3
    assert sets[1] == {0, 2, 4, 5, 6}  # edge: 5
    assert sets[5] == {0, 1, 2, 4, 6, 8, 9, 10}  # interior: 8
    counts = valid.sum(1).tolist()
    assert sorted(counts) == [3] * 4 + [5] * 8 + [8] * 4
    # Invalid slots hold the patch's own index: a placeholder, never a real neighbour.
    own = torch.arange(16)[:, None].expand_as(index)
    assert torch.equal(index[~valid], own[~valid])


def test_wrap_needs_three_by_three() -> None:
    with pytest.raises(ValueError, match="at least 3 x 3"):
        neighbour_index(2, 5, "wrap")
    with pytest.raises(ValueError, match="border"):
        neighbour_index(4, 4, "reflect")  # type: ignore[arg-type]
    assert len(neighbour_sets(2, 2, "mask")[0]) == 3


# ------------------------------------------------------------------------------- top-k
def grid_tokens(angles_deg: list[float], norms: list[float]) -> torch.Tensor:
    """[1, N, 2] tokens at the given angles and lengths."""
    rad = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return (torch.stack([rad.cos(), rad.sin()], -1) * torch.tensor(norms)[:, None])[None].float()


# A 3 x 3 grid around centre patch 4 (angle 0): cosines to it are cos(angle). Patch 1 is long
# (norm 100) but at 80 degrees: it wins by dot product, loses by cosine.
ANGLES = [10, 80, 30, 170, 0, 45, 60, 25, 120]
NORMS = [1, 100, 0.5, 1, 1, 2, 1, 1, 1]


def test_top_k_ranks_neighbours_by_cosine() -> None:
    tokens = grid_tokens(ANGLES, NORMS)
    index, valid = neighbour_index(3, 3, "wrap")
    chosen, chosen_valid = select_neighbours(tokens, index, valid, k=4)
    assert chosen.shape == (1, 9, 4) and bool(chosen_valid.all())
    # cos: 0 -> 0.985, 7 -> 0.906, 2 -> 0.866, 5 -> 0.707 (then 6 -> 0.5, 1 -> 0.174, ...).
    assert chosen[0, 4].tolist() == [0, 7, 2, 5]
    # Patch 0 (10 degrees) on the wrapped 3 x 3 grid sees the 8 others: 4 (0 degrees),
    # 7 (25), 2 (30), 5 (45).
    assert chosen[0, 0].tolist() == [4, 7, 2, 5]
    # Dot products would have picked the long patch 1.
    dots = (tokens[0, index[4]] @ tokens[0, 4]).topk(4).indices
    assert 1 in index[4][dots].tolist()


def test_top_k_with_masked_border_puts_missing_slots_last() -> None:
    tokens = grid_tokens(ANGLES, NORMS)
    index, valid = neighbour_index(3, 3, "mask")
    chosen, chosen_valid = select_neighbours(tokens, index, valid, k=4)
    # Corner 0 has 3 neighbours: 4 (cos 10 deg), 1 (70 deg), 3 (160 deg); the 4th slot is void.
    assert chosen[0, 0, :3].tolist() == [4, 1, 3]
    assert chosen_valid[0, 0].tolist() == [True, True, True, False]
    assert bool(chosen_valid[0, 4].all())  # the centre has 8
    with pytest.raises(ValueError, match="k must be"):
        select_neighbours(tokens, index, valid, k=9)


# ------------------------------------------------------------------------------- aggregate
def loop_aggregate(agg: PatchAggregator, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """The teacher's aggregate [N, D] of one image [N=h*w, D] on a square wrapped grid, one patch
    and one head at a time (SelfPatchHead.forward(loc=True) and Class_Attention, plainly)."""
    side = int(math.sqrt(tokens.shape[0]))
    neighbours = authors_local_index(side * side)
    out = []
    for p in range(tokens.shape[0]):
        cands = sorted(neighbours[p])
        sims = [F.cosine_similarity(tokens[c], tokens[p], dim=0).item() for c in cands]
        best = [c for _, c in sorted(zip(sims, cands, strict=True), reverse=True)[:k]]
        x_cls = agg.query_token[0, 0]
        for blk in agg.blocks:
            seq = blk.norm1(torch.stack([x_cls] + [tokens[c] for c in best]))
            heads = blk.attn.num_heads
            q = blk.attn.q(seq[0]).chunk(heads)
            keys = blk.attn.k(seq).chunk(heads, dim=-1)
            values = blk.attn.v(seq).chunk(heads, dim=-1)
            parts = []
            for h in range(heads):
                weights = torch.softmax(keys[h] @ q[h] * blk.attn.scale, dim=0)
                parts.append(weights @ values[h])
            x_cls = x_cls + blk.attn.proj(torch.cat(parts))
            x_cls = x_cls + blk.mlp(blk.norm2(x_cls))
        out.append(agg.norm(x_cls))
    return torch.stack(out)


def test_aggregate_equals_a_per_patch_loop() -> None:
    torch.manual_seed(0)
    method = SelfPatch(**TINY_SELFPATCH).eval()
    patch = torch.randn(2, 4, 4, method.student.backbone.embed_dim)
    with torch.no_grad():
        got = method.aggregate_neighbours(method.teacher, patch)
        assert got.shape == (2, 16, patch.shape[-1])
        for b in range(2):
            want = loop_aggregate(method.teacher.aggregator, patch[b].flatten(0, 1), k=4)
            torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


def test_aggregate_ignores_masked_and_unchosen_tokens() -> None:
    torch.manual_seed(0)
    agg = PatchAggregator(dim=12, num_heads=3).eval()
    tokens = torch.randn(5, 4, 12)
    valid = torch.tensor([True, True, False, False]).expand(5, 4)
    with torch.no_grad():
        out = agg(tokens, None, valid)
        assert out.shape == (5, 12)
        changed = tokens.clone()
        changed[:, 2:] = 100.0  # masked keys
        torch.testing.assert_close(agg(changed, None, valid), out)
        torch.testing.assert_close(agg(tokens[:, :2]), out, atol=1e-6, rtol=1e-6)
        # A patch that is neither chosen nor the centre does not move the aggregate.
        method = SelfPatch(**TINY_SELFPATCH).eval()
        patch = grid_tokens(ANGLES, NORMS).repeat(1, 1, 96).reshape(1, 3, 3, 192)
        base = method.aggregate_neighbours(method.teacher, patch)[0, 4]
        moved = patch.clone()
        moved[0, 2, 0] *= 0.5  # patch 6 (cos 0.5: rank 5) keeps its angle and rank
        torch.testing.assert_close(method.aggregate_neighbours(method.teacher, moved)[0, 4], base)


# ------------------------------------------------------------------------------------ loss
def ce_by_hand(teacher: list[float], student: list[float], t_temp: float, s_temp: float) -> float:
    q = [math.exp(t / t_temp) for t in teacher]
    q = [v / sum(q) for v in q]
    log_z = math.log(sum(math.exp(s / s_temp) for s in student))
    return -sum(qi * (s / s_temp - log_z) for qi, s in zip(q, student, strict=True))


def test_patch_loss_by_hand() -> None:
    loss = PatchLoss(out_dim=2, student_temp=0.1)
    # View 0: one patch; view 1: two patches. Center 0.
    t0, s0 = [[1.0, 0.0]], [[0.1, 0.0]]
    t1, s1 = [[0.0, 0.5], [0.2, 0.2]], [[0.3, -0.1], [0.0, 0.4]]
    got = loss(
        [torch.tensor([s0]), torch.tensor([s1])], [torch.tensor([t0]), torch.tensor([t1])], 0.5
    )
    view0 = ce_by_hand(t0[0], s0[0], 0.5, 0.1)
    view1 = (ce_by_hand(t1[0], s1[0], 0.5, 0.1) + ce_by_hand(t1[1], s1[1], 0.5, 0.1)) / 2
    assert got.item() == pytest.approx((view0 + view1) / 2, rel=1e-6)  # views weigh equally
    # view 0 alone: softmax([2, 0]) against log_softmax([1, 0]).
    assert view0 == pytest.approx(0.432465, abs=1e-6)
    # The center: one mean over the 3 patches of both views, EMA 0.9 from 0.
    loss.update_center([torch.tensor([t0]), torch.tensor([t1])])
    mean = torch.tensor([t0[0], *t1]).mean(0, keepdim=True)
    torch.testing.assert_close(loss.center, 0.1 * mean)
    with pytest.raises(ValueError, match="same shape"):
        loss([torch.zeros(1, 2, 2)], [torch.zeros(1, 3, 2)], 0.5)


# ---------------------------------------------------------------------------------- method
def test_losses_are_wired_as_selfpatch(batch: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    method = SelfPatch(**TINY_SELFPATCH)
    aggregated_by = []
    original = SelfPatch.aggregate_neighbours

    def spy(self, net, patch):
        aggregated_by.append(net)
        return original(self, net, patch)

    monkeypatch.setattr(SelfPatch, "aggregate_neighbours", spy)
    out = method.compute_losses(batch, StepState(teacher_temp=0.04))
    # Only the teacher aggregates, once per view (it processes all 4 views).
    assert aggregated_by == [method.teacher] * 4
    torch.testing.assert_close(
        out["loss"].detach(), out["loss_cls"] + 0.1 * out["loss_patch"], atol=1e-6, rtol=0
    )

    # The patch loss, rebuilt: student patch p of view v against the teacher's aggregate of
    # patch p of the same view v (centers were 0 before the step).
    fresh = PatchLoss(TINY_SELFPATCH["patch_out_dim"], 0.1)
    with torch.no_grad():
        t_feats = backbone_views(method.teacher.backbone, batch["views"])
        s_feats = backbone_views(method.student.backbone, batch["views"])
        teacher = [
            method.teacher.patch_head(original(method, method.teacher, f["patch"])) for f in t_feats
        ]
        student = [
            method.student.patch_head(method.student.aggregator.norm(f["patch"].flatten(1, 2)))
            for f in s_feats
        ]
        assert [t.shape[1] for t in teacher] == [16, 16, 9, 9]
        torch.testing.assert_close(fresh(student, teacher, 0.04), out["loss_patch"])
        shifted = [student[1], student[0], *student[2:]]  # another view's patches
        assert not torch.allclose(fresh(shifted, teacher, 0.04), out["loss_patch"])
        # Image-level center: the teacher outputs of all 4 views (the authors' update).
        t_out = method.teacher.head(method.image_tokens(method.teacher, t_feats))
        want = 0.1 * t_out.flatten(0, 1).mean(0, keepdim=True)
        torch.testing.assert_close(method.dino_loss.center, want)


def test_image_token_starts_from_cls_or_the_query_alone(batch: dict) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for image_token, depends in (("cls", True), ("query", False)):
            method = SelfPatch(**TINY_SELFPATCH, image_token=image_token)
            feats = backbone_views(method.student.backbone, batch["views"][:1])
            other = [{"cls": f["cls"] + 1.0, "patch": f["patch"]} for f in feats]
            same = torch.allclose(
                method.image_tokens(method.student, feats),
                method.image_tokens(method.student, other),
            )
            assert same != depends, image_token
    with pytest.raises(ValueError, match="image_token"):
        SelfPatch(**TINY_SELFPATCH, image_token="mean")  # type: ignore[arg-type]


def test_backward_reaches_both_heads_and_epoch_zero_freezes_their_last_layers(
    batch: dict,
) -> None:
    from mmengine.optim import OptimWrapper

    from densedino.train.model import SSLModel
    from densedino.train.optim import dino_param_groups

    model = SSLModel(method=dict(type="SelfPatch", **TINY_SELFPATCH), freeze_last_layer=1)
    student = model.method.student
    wrapper = OptimWrapper(torch.optim.AdamW(dino_param_groups(student), lr=1e-2))
    heads = [student.head, student.patch_head]
    for epoch, frozen in ((0, True), (1, False)):
        before = [h.last_layer.weight_v.clone() for h in heads]
        query_before = student.aggregator.query_token.clone()
        model.state = StepState(epoch=epoch)
        model.train_step(dict(batch), wrapper)
        for head, old in zip(heads, before, strict=True):
            assert torch.equal(head.last_layer.weight_v, old) == frozen, epoch
        # The aggregator learns through the image-level token.
        assert not torch.equal(student.aggregator.query_token, query_before)
    assert all(not p.requires_grad for p in model.method.teacher.parameters())


# ------------------------------------------------------------------------------------- CLI
# The demo config scaled down (tests/cli_runs.py).
RUN_CONFIG = small_run_config("selfpatch_vit-t_demo.py", "")
EPOCHS = 16  # 80 training images / 16 = 5 iterations per epoch: 80 iterations


@pytest.mark.slow
def test_cli_trains_exports_and_evaluates(tmp_path: Path) -> None:
    from densedino.data import write_demo_dataset
    from densedino.weights import load_backbone

    # On the default "class" data the image-level (DINO) loss first rises for about 40-100
    # iterations, as DINO's does in the main job (README), longer than this test runs; on the
    # shape-only data it falls within 80 iterations.
    data = write_demo_dataset(
        tmp_path / "demo", num_images=100, image_size=64, workers=1, appearance="random"
    )
    config = tmp_path / "selfpatch.py"
    config.write_text(RUN_CONFIG)
    work = tmp_path / "run"
    output = run(
        sys.executable, "-m", "densedino.cli.train", config, "--work-dir", work,
        "--cfg-options", f"train_cfg.max_epochs={EPOCHS}",
        f"train_dataloader.dataset.root={data.imagenet_train}",
    )  # fmt: skip

    loss, patch = logged(work, "loss"), logged(work, "loss_patch")
    assert len(loss) == EPOCHS * 5
    # Noisy per iteration (batches of 16): compare the first and last quarters of the run.
    print(f"SelfPatch loss {mean(loss[:20]):.3f} -> {mean(loss[-20:]):.3f}, patch loss "
          f"{mean(patch[:20]):.3f} -> {mean(patch[-20:]):.3f}")  # fmt: skip
    assert mean(loss[-20:]) < mean(loss[:20]) - 0.05
    assert mean(patch[-20:]) < mean(patch[:20]) - 0.2
    # No collapse: the monitor flagged nothing, and its signals stayed in the healthy range.
    assert "0 iterations flagged as collapsed" in output
    assert min(logged(work, "feature_std")) > 0.2
    assert max(logged(work, "teacher_entropy")) < 0.99
    assert max(logged(work, "patch_teacher_entropy")) < 0.99

    # The exported teacher backbone loads and goes through k-NN and the segmentation probe.
    export = work / "export" / "backbone.safetensors"
    assert json.loads((work / "export" / "backbone.json").read_text())["method"] == "SelfPatch"
    backbone = load_backbone(export)
    assert (backbone.depth, backbone.patch_size, backbone.img_size) == (2, 8, 32)
    assert_export_evaluates(export, data, tmp_path)

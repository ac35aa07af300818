"""Method plug-ins: DINO and DenseDINO on real multi-view batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny import TINY_DINO

from densedino.data.collate import collate_views
from densedino.data.view_config import ViewConfig
from densedino.data.views import MultiViewTransform
from densedino.methods.base import StepState
from densedino.methods.densedino import DenseDINO, forward_views_with_points
from densedino.methods.dino import DINO
from densedino.train.hooks import dino_schedule, teacher_temperature

VIEWS = ViewConfig(
    num_global=2, global_size=32, num_local=2, local_size=16, num_points=3, photometric=False
)


@pytest.fixture(scope="module")
def batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    transform = MultiViewTransform(VIEWS)
    images = torch.randint(0, 256, (4, 3, 48, 64), dtype=torch.uint8, generator=generator)
    return collate_views([transform(img, generator=generator) for img in images])


def test_reference_tokens_leave_the_cls_loss_unchanged(batch: dict) -> None:
    torch.manual_seed(0)
    dense = DenseDINO(**TINY_DINO, alpha=0.5)
    dino = DINO(**TINY_DINO)
    dino.load_state_dict(dense.state_dict(), strict=False)  # same backbone and CLS head
    state = StepState(teacher_temp=0.04)
    out_dense = dense.compute_losses(batch, state)
    out_dino = dino.compute_losses(batch, state)
    torch.testing.assert_close(out_dense["loss_cls"], out_dino["loss_cls"], atol=1e-5, rtol=0)
    expected = 0.5 * out_dense["loss_cls"] + 0.5 * out_dense["loss_ref"]
    torch.testing.assert_close(out_dense["loss"].detach(), expected)
    assert out_dense["loss"].requires_grad and math.isfinite(out_dense["loss"].item())


def test_reference_pairs_and_partners_by_hand() -> None:
    # 4 views, 2 teachers: every teacher view with every other view (authors' layout) ...
    method = DenseDINO(**TINY_DINO)
    assert method.ref_loss_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    assert method.partners(4) == ([[1, 2, 3], [0, 2, 3]], [[1], [0], [0, 1], [0, 1]])
    assert len(method.ref_loss_pairs(4)) == 2 * (4 - 1)
    # ... or only the two teacher views with each other.
    pairs_global = DenseDINO(**TINY_DINO, ref_pairs="global")
    assert pairs_global.ref_loss_pairs(4) == [(0, 1), (1, 0)]
    assert pairs_global.partners(4) == ([[1], [0]], [[1], [0], [], []])


def test_reference_pairs_point_at_the_same_locations(batch: dict) -> None:
    """The tokens the reference heads get for pair (iq, v) are those of the pair's own points:
    teacher view iq run alone with ``points[:, iq, v]`` and student view v alone with
    ``points[:, v, iq]`` (the views test checks that those decode to the same image location)."""
    torch.manual_seed(0)
    method = DenseDINO(**TINY_DINO)
    with torch.no_grad():  # a teacher that is not the student: the networks are told apart
        for param in method.teacher.parameters():
            param.add_(0.05 * torch.randn_like(param))
    seen: dict[str, torch.Tensor] = {}
    for side in ("teacher", "student"):
        head = getattr(method, side).ref_head
        head.register_forward_hook(lambda _m, args, _out, side=side: seen.update({side: args[0]}))
    method.compute_losses(batch, StepState())
    views, points = batch["views"], batch["points"]
    pairs = method.ref_loss_pairs(len(views))
    assert seen["teacher"].shape[:3] == seen["student"].shape[:3] == (len(pairs), 4, 3)
    for p, (iq, v) in enumerate(pairs):
        assert not torch.isnan(points[:, iq, v]).any() and not torch.isnan(points[:, v, iq]).any()
        with torch.no_grad():
            t_side = method.teacher.backbone.forward_features(views[iq], points[:, iq, v])["ref"]
            s_side = method.student.backbone.forward_features(views[v], points[:, v, iq])["ref"]
        torch.testing.assert_close(seen["teacher"][p], t_side, atol=1e-5, rtol=0)
        torch.testing.assert_close(seen["student"][p].detach(), s_side, atol=1e-5, rtol=0)
    assert len(pairs) == 2 * (len(views) - 1)


def test_forward_views_pads_points_without_changing_outputs(batch: dict) -> None:
    torch.manual_seed(0)
    backbone = DenseDINO(**TINY_DINO).student.backbone.eval()
    views = batch["views"][:2]
    short = batch["points"][:, 0, [1]].flatten(1, 2)
    long = batch["points"][:, 1, [0, 2, 3]].flatten(1, 2)
    _, refs = forward_views_with_points(backbone, views, [short, long])
    alone = backbone.forward_features(views[0], short)["ref"]
    assert refs[0].shape == (*short.shape[:2], backbone.embed_dim)
    torch.testing.assert_close(refs[0], alone, atol=1e-5, rtol=0)


def test_alpha_zero_trains_the_reference_loss_only(batch: dict) -> None:
    method = DenseDINO(**TINY_DINO, alpha=0.0)
    out = method.compute_losses(batch, StepState())
    torch.testing.assert_close(out["loss"].detach(), out["loss_ref"])
    out["loss"].backward()
    assert method.student.head.mlp[0].weight.grad is None
    assert method.student.ref_head.mlp[0].weight.grad is not None


def test_teacher_is_an_ema_of_the_student() -> None:
    method = DINO(**TINY_DINO)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.update_teacher(0.9)
    student = method.student.state_dict()
    for name, param in method.teacher.named_parameters():
        torch.testing.assert_close(param, 0.9 * teacher_before[name] + 0.1 * student[name])
        assert not param.requires_grad


def test_centers_move_only_after_the_loss(batch: dict) -> None:
    method = DenseDINO(**TINY_DINO)
    assert method.dino_loss.center.abs().sum() == 0 and method.ref_loss.center.abs().sum() == 0
    method.compute_losses(batch, StepState())
    assert method.dino_loss.center.abs().sum() > 0 and method.ref_loss.center.abs().sum() > 0


def dino_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup=0):
    """facebookresearch/dino utils.cosine_scheduler, verbatim in numpy."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup, base, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3])
def test_schedules_equal_dino(warmup_epochs: int) -> None:
    epochs, per_epoch = 7, 5
    total = epochs * per_epoch
    expected = dino_cosine_scheduler(1e-3, 1e-6, epochs, per_epoch, warmup_epochs)
    ours = [dino_schedule(1e-3, 1e-6, total, i, warmup_epochs * per_epoch) for i in range(total)]
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)


def test_teacher_temperature_warmup_equals_dino() -> None:
    expected = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    ours = [teacher_temperature(0.04, 0.07, 30, epoch) for epoch in range(100)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_train_step_freezes_the_last_layer_in_epoch_zero(batch: dict) -> None:
    from mmengine.optim import OptimWrapper

    from densedino.train.model import SSLModel
    from densedino.train.optim import dino_param_groups

    model = SSLModel(method=dict(type="DenseDINO", **TINY_DINO), freeze_last_layer=1)
    optimizer = torch.optim.AdamW(dino_param_groups(model.method.student), lr=1e-2)
    wrapper = OptimWrapper(optimizer)
    heads = [model.method.student.head, model.method.student.ref_head]
    for epoch, frozen in ((0, True), (1, False)):
        before = [h.last_layer.weight_v.clone() for h in heads]
        mlp_before = heads[0].mlp[0].weight.clone()
        model.state = StepState(epoch=epoch)
        model.train_step(dict(batch), wrapper)
        for head, old in zip(heads, before, strict=True):
            assert torch.equal(head.last_layer.weight_v, old) == frozen, epoch
        assert not torch.equal(heads[0].mlp[0].weight, mlp_before)  # the rest trains

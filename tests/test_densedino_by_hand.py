"""``DenseDINO.compute_losses`` end to end against the loss written out pair by pair.

The hand computation runs the backbone once per (view, pair) with only that pair's points, the
heads, DINO's cross-entropy with the centers and temperatures, and the alpha combination; the
total loss and every student gradient must agree. Teacher and student weights, both centers and
the two directions of every pair's points all differ, so a swapped pair index, view or side
changes the result.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY_DINO
from torch import Tensor

from densedino.methods import DenseDINO
from densedino.methods.base import StepState

TEACHER_TEMP = 0.05
NUM_POINTS = 2


def small_method(**kw: object) -> DenseDINO:
    torch.manual_seed(0)
    # Other head sizes than TINY_DINO's: 32 prototypes, as the centers below.
    method = DenseDINO(
        **{**TINY_DINO, "out_dim": 32, "head": dict(hidden_dim=24, bottleneck_dim=12), **kw}
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in method.teacher.parameters():  # a teacher that is not the student
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
        method.dino_loss.centering.center.copy_(torch.randn(1, 32, generator=generator))
        method.ref_loss.centering.center.copy_(torch.randn(1, 32, generator=generator))
    return method


def make_batch(batch: int = 3) -> dict:
    """2 teacher views of 32 px + 2 views of 16 px; independent random points per direction."""
    generator = torch.Generator().manual_seed(2)
    sizes = (32, 32, 16, 16)
    views = [torch.randn(batch, 3, s, s, generator=generator) for s in sizes]
    points = torch.rand(batch, 4, 4, NUM_POINTS, 2, generator=generator) * 2 - 1
    return {"views": views, "points": points}


def cross_entropy(student: Tensor, teacher: Tensor, center: Tensor, student_temp: float) -> Tensor:
    """DINO's CE for one pair, mean over every leading index."""
    q = F.softmax((teacher - center) / TEACHER_TEMP, dim=-1)
    return (-q * F.log_softmax(student / student_temp, dim=-1)).sum(-1).mean()


def by_hand(method: DenseDINO, batch: dict, cls_pairs: str, ref_pairs: str) -> Tensor:
    views, points = batch["views"], batch["points"]
    num_views, num_t = len(views), method.num_teacher
    cls_center = method.dino_loss.center.clone()
    ref_center = method.ref_loss.center.clone()
    temp = method.dino_loss.student_temp
    teacher, student = method.teacher, method.student

    cls_losses = []
    last = num_t if cls_pairs == "global" else num_views
    for iq in range(num_t):
        for v in range(last):
            if v == iq:
                continue
            with torch.no_grad():
                t = teacher.head(teacher.backbone.forward_features(views[iq])["cls"])
            s = student.head(student.backbone.forward_features(views[v])["cls"])
            cls_losses.append(cross_entropy(s, t, cls_center, temp))

    ref_losses = []
    last = num_t if ref_pairs == "global" else num_views
    for iq in range(num_t):
        for v in range(last):
            if v == iq:
                continue
            # The same image locations: pair (iq, v) in view iq's frame, (v, iq) in view v's.
            with torch.no_grad():
                t_ref = teacher.backbone.forward_features(views[iq], points[:, iq, v])["ref"]
                t = teacher.ref_head(t_ref)
            s_ref = student.backbone.forward_features(views[v], points[:, v, iq])["ref"]
            s = student.ref_head(s_ref)
            ref_losses.append(cross_entropy(s, t, ref_center, temp))

    loss_cls = torch.stack(cls_losses).mean()
    loss_ref = torch.stack(ref_losses).mean()
    return method.alpha * loss_cls + (1 - method.alpha) * loss_ref


def student_grads(method: DenseDINO, loss: Tensor) -> dict[str, Tensor]:
    method.student.zero_grad()
    loss.backward()
    return {
        name: p.grad.clone() for name, p in method.student.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize(
    ("alpha", "cls_pairs", "ref_pairs"),
    [(0.5, "all", "all"), (0.3, "global", "all"), (0.7, "all", "global")],
)
def test_compute_losses_equals_the_per_pair_computation(alpha, cls_pairs, ref_pairs):
    method = small_method(alpha=alpha, cls_pairs=cls_pairs, ref_pairs=ref_pairs)
    batch = make_batch()
    expected = by_hand(method, batch, cls_pairs, ref_pairs)
    want = student_grads(method, expected)
    state = StepState(teacher_temp=TEACHER_TEMP)
    got_loss = method.compute_losses(batch, state)["loss"]
    got = student_grads(method, got_loss)
    torch.testing.assert_close(got_loss, expected, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys()
    assert {n.split(".")[0] for n in got} == {"backbone", "head", "ref_head"}
    for name, grad in want.items():
        scale = grad.abs().max().clamp_min(1e-8)
        assert (got[name] - grad).abs().max() / scale < 1e-4, name


def test_a_swapped_pair_index_is_detected():
    """The test above can fail: the hand computation with the two directions of the points
    exchanged differs from the method by far more than its tolerance."""
    method = small_method()
    batch = make_batch()
    expected = by_hand(method, batch, "all", "all")
    swapped = dict(batch, points=batch["points"].transpose(1, 2))
    wrong = by_hand(method, swapped, "all", "all")
    assert (wrong - expected).abs() > 1e-3

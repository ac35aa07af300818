"""Tests for densedino.losses: centering, DINO loss, reference loss, combination.

Expected values are computed with explicit numpy formulas, not through the package's code.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densedino.checks import check_temperature
from densedino.losses import Center, DINOLoss, ReferenceLoss, combine
from densedino.losses.dino import soft_cross_entropy

C = 4
TEACHER_TEMP = 0.04
STUDENT_TEMP = 0.1


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_ce(t: np.ndarray, s: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy between teacher row(s) t and student row(s) s."""
    q = np_softmax((t - center) / TEACHER_TEMP)
    return -(q * np_log_softmax(s / STUDENT_TEMP)).sum(axis=-1)


def with_center(loss: DINOLoss | ReferenceLoss, center: np.ndarray) -> None:
    loss.centering.center.copy_(torch.from_numpy(center).float().reshape(1, -1))


@pytest.fixture
def views() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    student = rng.normal(size=(4, 2, C)).astype(np.float32)  # V=4 views, B=2
    teacher = rng.normal(size=(2, 2, C)).astype(np.float32) * 0.2  # T=2
    center = np.array([0.05, -0.1, 0.02, 0.08], dtype=np.float32)
    return student, teacher, center


# --- DINOLoss -------------------------------------------------------------------------------


def test_dino_loss_default_pairs_with_center(views) -> None:
    student, teacher, center = views
    loss_fn = DINOLoss(C)
    with_center(loss_fn, center)
    got = loss_fn(torch.from_numpy(student), torch.from_numpy(teacher), TEACHER_TEMP)

    terms = []
    for iq in range(2):
        for v in range(4):
            if v != iq:
                terms.append(np_ce(teacher[iq], student[v], center).mean())
    assert len(terms) == 6
    assert got.item() == pytest.approx(float(np.mean(terms)), rel=1e-5)
    # A list of per-view tensors gives the same value.
    as_list = [torch.from_numpy(s) for s in student]
    assert loss_fn(as_list, torch.from_numpy(teacher), TEACHER_TEMP).item() == pytest.approx(
        got.item(), rel=1e-6
    )


def test_dino_loss_tiny_hand_value() -> None:
    # C=2, B=1, T=1, V=2: only pair (0, 1). Teacher logits equal -> q = (0.5, 0.5);
    # student logits (0, 0.1 * ln 3) -> p = (1/4, 3/4); CE = -(ln(1/4) + ln(3/4)) / 2.
    loss_fn = DINOLoss(2)
    student = torch.tensor([[[5.0, -5.0]], [[0.0, 0.1 * np.log(3.0)]]])
    teacher = torch.tensor([[[0.3, 0.3]]])
    got = loss_fn(student, teacher, teacher_temp=0.04).item()
    assert got == pytest.approx(-(np.log(0.25) + np.log(0.75)) / 2, rel=1e-5)


def test_dino_loss_custom_pairs(views) -> None:
    student, teacher, center = views
    loss_fn = DINOLoss(C)
    with_center(loss_fn, center)
    s, t = torch.from_numpy(student), torch.from_numpy(teacher)
    got = loss_fn(s, t, TEACHER_TEMP, pairs=[(0, 1), (1, 0)])
    expected = (
        np_ce(teacher[0], student[1], center).mean() + np_ce(teacher[1], student[0], center).mean()
    ) / 2
    assert got.item() == pytest.approx(float(expected), rel=1e-5)
    assert got.item() != pytest.approx(loss_fn(s, t, TEACHER_TEMP).item(), rel=1e-3)


def test_dino_loss_gradient_reaches_student_only_and_center_is_untouched(views) -> None:
    student, teacher, center = views
    loss_fn = DINOLoss(C)
    with_center(loss_fn, center)
    s = torch.from_numpy(student).requires_grad_()
    t = torch.from_numpy(teacher).requires_grad_()
    loss_fn(s, t, TEACHER_TEMP).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    np.testing.assert_array_equal(loss_fn.center.numpy(), center.reshape(1, -1))


def test_center_ema_from_zero() -> None:
    rng = np.random.default_rng(1)
    first = rng.normal(size=(2, 3, C)).astype(np.float32)
    second = rng.normal(size=(5, C)).astype(np.float32)
    loss_fn = DINOLoss(C)
    np.testing.assert_array_equal(loss_fn.center.numpy(), np.zeros((1, C)))
    loss_fn.update_center(torch.from_numpy(first))
    expected = 0.1 * first.reshape(-1, C).mean(axis=0)
    np.testing.assert_allclose(loss_fn.center.numpy()[0], expected, rtol=1e-5, atol=1e-7)
    loss_fn.update_center(torch.from_numpy(second))
    expected = 0.9 * expected + 0.1 * second.mean(axis=0)
    np.testing.assert_allclose(loss_fn.center.numpy()[0], expected, rtol=1e-5, atol=1e-7)
    assert "centering.center" in loss_fn.state_dict()


def test_center_update_has_no_grad_and_skips_empty_batches() -> None:
    center = Center(C, momentum=0.5)
    x = torch.ones(3, C, requires_grad=True)
    center.update(x)
    assert not center.center.requires_grad
    np.testing.assert_allclose(center.center.numpy(), np.full((1, C), 0.5))
    center.update(torch.empty(0, C))
    np.testing.assert_allclose(center.center.numpy(), np.full((1, C), 0.5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher_temp": 0.0}, "teacher_temp"),
        ({"teacher_temp": float("nan")}, "teacher_temp"),
        ({"pairs": [(0, 4)]}, "out of range"),
        ({"pairs": [(2, 0)]}, "out of range"),
        ({"pairs": [(-1, 0)]}, "out of range"),
        ({"pairs": []}, "no \\(teacher, student\\) pairs"),
    ],
)
def test_dino_loss_argument_errors(views, kwargs, match) -> None:
    student, teacher, _ = views
    args = {"teacher_temp": TEACHER_TEMP, **kwargs}
    with pytest.raises(ValueError, match=match):
        DINOLoss(C)(torch.from_numpy(student), torch.from_numpy(teacher), **args)


def test_dino_loss_shape_errors() -> None:
    loss_fn = DINOLoss(C)
    with pytest.raises(ValueError, match=r"student_out must be \[V, B, 4\]"):
        loss_fn(torch.zeros(3, 2, 5), torch.zeros(2, 2, C), TEACHER_TEMP)
    with pytest.raises(ValueError, match=r"teacher_out must be \[T, B, 4\]"):
        loss_fn(torch.zeros(3, 2, C), torch.zeros(2, C), TEACHER_TEMP)
    with pytest.raises(ValueError, match="batch size differs"):
        loss_fn(torch.zeros(3, 2, C), torch.zeros(2, 3, C), TEACHER_TEMP)
    with pytest.raises(ValueError, match="differ in shape"):
        loss_fn([torch.zeros(2, C), torch.zeros(3, C)], torch.zeros(2, 2, C), TEACHER_TEMP)
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(C, student_temp=-0.1)
    with pytest.raises(ValueError, match="momentum"):
        DINOLoss(C, center_momentum=1.5)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        loss_fn.update_center(torch.zeros(2, 3))


# --- ReferenceLoss --------------------------------------------------------------------------


@pytest.fixture
def refs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    student = rng.normal(size=(3, 2, 2, C)).astype(np.float32)  # P=3, B=2, K=2
    teacher = rng.normal(size=(3, 2, 2, C)).astype(np.float32) * 0.2
    center = np.array([-0.03, 0.07, 0.0, 0.1], dtype=np.float32)
    return student, teacher, center


def test_reference_loss_value(refs) -> None:
    student, teacher, center = refs
    loss_fn = ReferenceLoss(C)
    with_center(loss_fn, center)
    got = loss_fn(torch.from_numpy(student), torch.from_numpy(teacher), TEACHER_TEMP)
    per_pair = [np_ce(teacher[p], student[p], center).mean() for p in range(3)]
    assert got.item() == pytest.approx(float(np.mean(per_pair)), rel=1e-5)


def test_reference_loss_valid_mask(refs) -> None:
    student, teacher, center = refs
    valid = np.array(
        [
            [[True, True], [True, False]],  # pair 0: 3 valid tokens
            [[False, False], [False, False]],  # pair 1: none, left out of the mean
            [[False, True], [False, False]],  # pair 2: 1 valid token
        ]
    )
    # Garbage in ignored tokens must not matter.
    student = student.copy()
    student[~valid] = 1e4
    loss_fn = ReferenceLoss(C)
    with_center(loss_fn, center)
    s = torch.from_numpy(student).requires_grad_()
    got = loss_fn(s, torch.from_numpy(teacher), TEACHER_TEMP, valid=torch.from_numpy(valid))

    ce = np_ce(teacher, student, center)  # [P, B, K]
    expected = (ce[0][valid[0]].mean() + ce[2][valid[2]].mean()) / 2
    assert got.item() == pytest.approx(float(expected), rel=1e-5)
    got.backward()
    assert s.grad is not None
    assert torch.count_nonzero(s.grad[torch.from_numpy(~valid)]) == 0

    all_valid = torch.ones(3, 2, 2, dtype=torch.bool)
    unmasked = loss_fn(torch.from_numpy(refs[0]), torch.from_numpy(teacher), TEACHER_TEMP)
    masked_all = loss_fn(
        torch.from_numpy(refs[0]), torch.from_numpy(teacher), TEACHER_TEMP, valid=all_valid
    )
    assert masked_all.item() == pytest.approx(unmasked.item(), rel=1e-6)


def test_reference_loss_nothing_valid_is_zero_with_graph(refs) -> None:
    student, teacher, _ = refs
    s = torch.from_numpy(student).requires_grad_()
    got = ReferenceLoss(C)(
        s, torch.from_numpy(teacher), TEACHER_TEMP, valid=torch.zeros(3, 2, 2, dtype=torch.bool)
    )
    assert got.item() == 0.0
    got.backward()
    assert s.grad is not None and torch.count_nonzero(s.grad) == 0


def test_reference_center_is_separate_and_respects_valid(refs) -> None:
    _, teacher, _ = refs
    loss_fn = ReferenceLoss(C)
    valid = torch.zeros(3, 2, 2, dtype=torch.bool)
    valid[0, 1, 0] = valid[2, 0, 1] = True
    loss_fn(torch.from_numpy(teacher), torch.from_numpy(teacher), TEACHER_TEMP)
    np.testing.assert_array_equal(loss_fn.center.numpy(), np.zeros((1, C)))
    loss_fn.update_center(torch.from_numpy(teacher), valid=valid)
    expected = 0.1 * (teacher[0, 1, 0] + teacher[2, 0, 1]) / 2
    np.testing.assert_allclose(loss_fn.center.numpy()[0], expected, rtol=1e-5, atol=1e-7)


def test_reference_loss_errors(refs) -> None:
    student, teacher, _ = refs
    s, t = torch.from_numpy(student), torch.from_numpy(teacher)
    loss_fn = ReferenceLoss(C)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(s, t[:, :, :1], TEACHER_TEMP)
    with pytest.raises(ValueError, match=r"student_ref must be \[P, B, K, 4\]"):
        loss_fn(s[0], t[0], TEACHER_TEMP)
    with pytest.raises(ValueError, match=r"teacher_ref must be \[P, B, K, 4\]"):
        loss_fn(s, torch.zeros(3, 2, 2, 5), TEACHER_TEMP)
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        loss_fn(s, t, TEACHER_TEMP, valid=torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        loss_fn(s, t, TEACHER_TEMP, valid=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher_temp"):
        loss_fn(s, t, -1.0)
    with pytest.raises(ValueError, match="P = 0"):
        loss_fn(s[:0], t[:0], TEACHER_TEMP)


def test_combine() -> None:
    cls, ref = torch.tensor(2.0), torch.tensor(6.0)
    assert combine(cls, ref).item() == 4.0
    assert combine(cls, ref, alpha=0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 6)
    with pytest.raises(ValueError, match="alpha"):
        combine(cls, ref, alpha=1.2)


# --- distributed centering --------------------------------------------------------------------


def _center_updates(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Join a gloo group, run the center updates of `rank`, save the center, leave the group."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        data = torch.load(Path(out_dir) / "data.pt")
        loss_fn = DINOLoss(C)
        for step in data:
            loss_fn.update_center(step[rank])
        torch.save(loss_fn.center.clone(), Path(out_dir) / f"center{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_center_all_reduce_with_unequal_batches(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    # Two steps; rank 0 holds 2 views x 1 sample, rank 1 holds 2 views x 4 samples. The offset
    # on rank 0 makes a mean of per-rank means differ from the true mean.
    data = [
        [torch.randn(2, 1, C, generator=gen) + 3.0, torch.randn(2, 4, C, generator=gen)]
        for _ in range(2)
    ]
    torch.save(data, tmp_path / "data.pt")
    args = (2, str(tmp_path / "init"), str(tmp_path))
    # This process is rank 0 and a single spawned process is rank 1 (one torch import, not two).
    child = mp.get_context("spawn").Process(target=_center_updates, args=(1, *args))
    child.start()
    try:
        _center_updates(0, *args)
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
    assert not dist.is_initialized()

    expected = np.zeros(C)
    for rank0, rank1 in data:
        rows = np.concatenate([rank0.reshape(-1, C).numpy(), rank1.reshape(-1, C).numpy()])
        expected = 0.9 * expected + 0.1 * rows.mean(axis=0)
    for rank in range(2):
        got = torch.load(tmp_path / f"center{rank}.pt").numpy()[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_check_temperature_names_the_argument(bad: float) -> None:
    # One check for the losses and the k-NN vote (densedino.checks).
    with pytest.raises(ValueError, match=r"^DINOLoss: teacher_temp must be a finite number > 0"):
        check_temperature(bad, "DINOLoss: teacher_temp")
    with pytest.raises(ValueError, match=r"^temperature must be"):
        check_temperature(bad)
    value = check_temperature(np.float32(0.5))
    assert type(value) is float and value == 0.5


@pytest.mark.parametrize("mass", [1.0, 0.6])
def test_soft_cross_entropy_own_backward_matches_autograd(mass: float) -> None:
    """The fused cross-entropy equals -sum(p * log_softmax(s / tau)) with autograd's gradient,
    also for probabilities that do not sum to 1."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 3, 4, 50)).requires_grad_(True)
    probs = torch.softmax(torch.randn(2, 3, 4, 50) / 0.3, dim=-1) * mass
    weights = torch.rand(2, 3, 4)
    plain = logits.detach().clone().requires_grad_(True)
    expected = -(probs * torch.log_softmax(plain / 0.1, dim=-1)).sum(-1)
    ce = soft_cross_entropy(logits, probs, 0.1)
    torch.testing.assert_close(ce, expected, rtol=1e-5, atol=1e-5)
    (ce * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(logits.grad, plain.grad, rtol=1e-5, atol=1e-6)


def test_soft_cross_entropy_grad_through_probs_and_bf16() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(3, 20, requires_grad=True)
    student = torch.randn(3, 20, requires_grad=True)
    soft_cross_entropy(student, torch.softmax(teacher, -1), 0.1).sum().backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0
    half = torch.randn(3, 20, dtype=torch.bfloat16, requires_grad=True)
    probs = torch.softmax(torch.randn(3, 20), -1)
    ce = soft_cross_entropy(half, probs, 0.1)
    assert ce.dtype == torch.float32
    ce.sum().backward()
    assert half.grad.dtype == torch.bfloat16
    expected = -(probs * torch.log_softmax(half.float() / 0.1, -1)).sum(-1)
    torch.testing.assert_close(ce, expected, rtol=1e-5, atol=1e-5)


def test_losses_under_bf16_autocast_reduce_in_float32() -> None:
    """Autocast runs ``matmul`` and ``vecdot`` in bf16; DINO's loss is element-wise and stays in
    float32 under AMP. With logits already in float32 (the heads' outputs are), the DINO and
    reference losses under autocast equal the float32 formulas to float32 precision (in bf16
    the sums over 4096 prototypes were off by about 1 %)."""
    torch.manual_seed(0)
    student = 30 * torch.randn(4, 3, 4096)
    teacher = 30 * torch.randn(2, 3, 4096)
    probs = torch.softmax(teacher / 0.04, dim=-1)
    log_p = torch.log_softmax(student / 0.1, dim=-1)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 3)]
    want_cls = torch.stack([-(probs[t] * log_p[s]).sum(-1).mean() for t, s in pairs]).mean()
    want_ce = -(probs[0] * log_p[1]).sum(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_cls = DINOLoss(4096).from_probs(student, probs, pairs)
        got_ce = soft_cross_entropy(student[1], probs[0], 0.1)
    torch.testing.assert_close(got_cls, want_cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ce, want_ce, rtol=1e-5, atol=1e-5)

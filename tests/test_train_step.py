"""The training step's pieces: multi-tensor EMA and clipping equal DINO's per-parameter loops,
the non-finite loss check, and logging that defers the device -> host transfers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper
from tiny import TINY_DINO, TINY_SELFPATCH
from torch import nn

from densedino.data.collate import collate_views
from densedino.data.view_config import ViewConfig
from densedino.data.views import MultiViewTransform
from densedino.methods.base import StepState
from densedino.methods.dino import DINO
from densedino.train.hooks import DeferredRuntimeInfoHook
from densedino.train.model import SSLModel, clip_gradients
from densedino.train.optim import dino_param_groups

VIEWS = ViewConfig(num_global=2, global_size=32, num_points=2, photometric=False)


@pytest.fixture(scope="module")
def batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    transform = MultiViewTransform(VIEWS)
    images = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8, generator=generator)
    return collate_views([transform(img, generator=generator) for img in images])


def loop_clip(module: nn.Module, max_norm: float) -> None:
    """DINO's utils.clip_gradients (per-parameter loop), the reference."""
    for param in module.parameters():
        if param.grad is not None:
            clip_coef = max_norm / (param.grad.data.norm(2) + 1e-6)
            if clip_coef < 1:
                param.grad.data.mul_(clip_coef)


def test_foreach_clipping_equals_dinos_per_parameter_loop() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.Linear(8, 4))
    scales = [0.01, 10.0, 1.0, 100.0, 0.1, 5.0]  # norms below and above the bound
    for param, scale in zip(net.parameters(), scales, strict=True):
        param.grad = torch.randn_like(param) * scale
    net[3].bias.grad = None  # a parameter without gradient is left alone
    reference = [p.grad.clone() if p.grad is not None else None for p in net.parameters()]
    holder = nn.Module()
    holder.params = nn.ParameterList(nn.Parameter(p.detach().clone()) for p in net.parameters())
    for p, g in zip(holder.params, reference, strict=True):
        p.grad = None if g is None else g.clone()
    loop_clip(holder, 3.0)
    clip_gradients(net, 3.0)
    clipped = 0
    for ours, theirs, before in zip(net.parameters(), holder.params, reference, strict=True):
        if before is None:
            assert ours.grad is None and theirs.grad is None
            continue
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-6)
        clipped += int(before.norm() > 3.0)
        assert ours.grad.norm() <= 3.0 + 1e-4
    assert clipped >= 2  # the bound was active on some parameters


def test_foreach_ema_equals_the_per_parameter_loop() -> None:
    method = DINO(**TINY_DINO)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(torch.randn_like(p))
    student = dict(method.student.named_parameters())
    expected = {}
    for name, param_t in method.teacher.named_parameters():
        ref = param_t.detach().clone()
        ref.mul_(0.996).add_(student[name].detach(), alpha=1 - 0.996)
        expected[name] = ref
    method.update_teacher(0.996)
    for name, param_t in method.teacher.named_parameters():
        torch.testing.assert_close(param_t, expected[name], rtol=1e-6, atol=1e-6)
        assert not param_t.requires_grad


def test_a_non_finite_loss_raises_and_updates_nothing(batch: dict) -> None:
    model = SSLModel(method=dict(type="DINO", **TINY_DINO))
    wrapper = OptimWrapper(torch.optim.AdamW(dino_param_groups(model.method.student), lr=1e-2))
    model.state = StepState(epoch=1, iteration=7)
    bad = dict(batch)
    bad["views"] = [v.clone() for v in batch["views"]]
    bad["views"][0][0, 0, 0, 0] = float("nan")
    student = {k: v.clone() for k, v in model.method.student.state_dict().items()}
    teacher = {k: v.clone() for k, v in model.method.teacher.state_dict().items()}
    with pytest.raises(FloatingPointError, match="loss is nan at iteration 7"):
        model.train_step(bad, wrapper)
    for name, value in model.method.student.state_dict().items():
        assert torch.equal(value, student[name]), name
    for name, value in model.method.teacher.state_dict().items():
        assert torch.equal(value, teacher[name]), name
    # The same step on finite views trains (a fresh model: the forward pass above already
    # folded the NaN teacher outputs into the centers, and a run stops at the error).
    model = SSLModel(method=dict(type="DINO", **TINY_DINO))
    wrapper = OptimWrapper(torch.optim.AdamW(dino_param_groups(model.method.student), lr=1e-2))
    student = {k: v.clone() for k, v in model.method.student.state_dict().items()}
    outputs = model.train_step(dict(batch), wrapper)
    assert torch.isfinite(outputs["loss"])
    changed = [not torch.equal(v, student[k]) for k, v in model.method.student.state_dict().items()]
    assert any(changed)


class FakeLoggerHook:
    """Stands for the runner's LoggerHook: only its interval is read."""

    def __init__(self, interval: int) -> None:
        self.interval = interval


def test_deferred_runtime_info_hands_every_value_over_at_log_intervals(monkeypatch) -> None:
    import densedino.train.hooks as hooks_module

    monkeypatch.setattr(hooks_module, "LoggerHook", FakeLoggerHook)
    hub = MessageHub("deferred-test")
    runner = SimpleNamespace(
        iter=0, message_hub=hub, hooks=[FakeLoggerHook(3)], train_dataloader=[None] * 7
    )
    hook = DeferredRuntimeInfoHook()
    logged = []
    for batch_idx in range(7):
        outputs = {"loss": torch.tensor(0.5 + batch_idx), "lr": torch.tensor(1e-3 * batch_idx)}
        logged.append({k: v.item() for k, v in outputs.items()})
        hook.after_train_iter(runner, batch_idx, outputs=outputs)
        runner.iter += 1
        history = hub.log_scalars["train/loss"].data[0] if "train/loss" in hub.log_scalars else []
        # Values reach the hub at batches 3 and 6 (the log interval) and 7 (end of epoch).
        expected = {0: 0, 1: 0, 2: 3, 3: 3, 4: 3, 5: 6, 6: 7}[batch_idx]
        assert len(history) == expected, batch_idx
    for key in ("loss", "lr"):
        values, _ = hub.log_scalars[f"train/{key}"].data
        assert list(values) == [entry[key] for entry in logged]


METHOD_CONFIGS = {
    "DINO": dict(TINY_DINO, num_teacher=2),
    "DenseDINO": dict(TINY_DINO),
    "SelfPatch": dict(TINY_SELFPATCH),
    "DenseCL": dict(
        arch="vit_tiny",
        patch_size=8,
        feat_dim=16,
        hidden_dim=32,
        queue_len=10,
        backbone=dict(img_size=32, depth=2),
    ),
}


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_uint8_views_train_every_method_as_float_views_do(name: str) -> None:
    """The train step normalises uint8 views itself: same loss as the float views' (to float32
    rounding), and the step trains."""
    cfg = ViewConfig(num_global=2, global_size=32, num_points=2, photometric=False)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8, generator=generator)
    batches = {}
    for dtype in ("float32", "uint8"):
        transform = MultiViewTransform(cfg, dtype=dtype)
        gen = torch.Generator().manual_seed(2)
        batches[dtype] = collate_views([transform(img, generator=gen) for img in images])
    assert batches["uint8"]["views"][0].dtype == torch.uint8
    torch.manual_seed(0)
    reference = SSLModel(method=dict(type=name, **METHOD_CONFIGS[name]))
    model = SSLModel(method=dict(type=name, **METHOD_CONFIGS[name]))
    model.load_state_dict(reference.state_dict())
    expected = reference.method.compute_losses(batches["float32"], StepState())["loss"]
    wrapper = OptimWrapper(torch.optim.AdamW(dino_param_groups(model.method.student), lr=1e-2))
    before = {k: v.clone() for k, v in model.method.student.state_dict().items()}
    outputs = model.train_step(dict(batches["uint8"]), wrapper)
    torch.testing.assert_close(outputs["loss"], expected.detach(), rtol=1e-5, atol=1e-5)
    after = model.method.student.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())


def test_cpu_bf16_autocast_runs_the_forward_in_bf16_and_keeps_float32_state(batch: dict) -> None:
    """``--amp bf16`` on CPU: matrix products in bf16, the loss within bf16 rounding of the
    float32 step's, and parameters, gradients and AdamW's moments still float32."""
    from densedino.train.optim import CPUAutocastOptimWrapper

    def build(wrapper_type: type[OptimWrapper]) -> tuple[SSLModel, OptimWrapper]:
        torch.manual_seed(0)
        model = SSLModel(method=dict(type="DenseDINO", **TINY_DINO))
        model.state = StepState(epoch=1)
        optimizer = torch.optim.AdamW(dino_param_groups(model.method.student), lr=1e-2)
        return model, wrapper_type(optimizer)

    model, wrapper = build(CPUAutocastOptimWrapper)
    dtypes = []
    qkv = model.method.student.backbone.blocks[0].attn.qkv
    qkv.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    loss = model.train_step(dict(batch), wrapper)["loss"]
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert not torch.is_autocast_enabled("cpu")  # left on leaving the step
    reference, reference_wrapper = build(OptimWrapper)
    expected = reference.train_step(dict(batch), reference_wrapper)["loss"]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)
    assert loss != expected  # the bf16 path really ran
    for param in model.method.student.parameters():
        assert param.dtype == torch.float32
    moments = [s["exp_avg"] for s in wrapper.optimizer.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's choice")
def test_amp_on_cpu_selects_bf16_autocast_and_refuses_fp16_or_emulated_bf16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from densedino.cli.train import build_config, train_parser

    config = str(Path(__file__).resolve().parents[1] / "configs/demo/densedino_vit-t_demo.py")
    args = train_parser().parse_args([config, "--work-dir", str(tmp_path), "--amp"])
    # True: bf16 instructions; None: not x86, so it cannot tell and runs.
    for native in (True, None):
        monkeypatch.setattr("densedino.train.optim.cpu_has_native_bf16", lambda n=native: n)
        assert build_config(args).optim_wrapper.type == "CPUAutocastOptimWrapper"
    monkeypatch.setattr("densedino.train.optim.cpu_has_native_bf16", lambda: False)
    with pytest.raises(SystemExit, match=r"no bf16 instructions .* drop --amp"):
        build_config(args)
    args = train_parser().parse_args([config, "--work-dir", str(tmp_path)])
    assert build_config(args).optim_wrapper.get("type", "OptimWrapper") == "OptimWrapper"
    args = train_parser().parse_args([config, "--work-dir", str(tmp_path), "--amp", "fp16"])
    with pytest.raises(SystemExit, match="fp16 needs a GPU; use --amp bf16"):
        build_config(args)

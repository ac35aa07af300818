"""mmengine glue: a method plug-in as an mmengine model, and its training step.

The step follows DINO's: forward (under the optimizer wrapper's autocast), backward, per-parameter
gradient clipping after unscaling, last layer frozen during the first epochs, optimizer step,
teacher EMA. The same function serves the plain model and the DDP wrapper.

The step never waits for the device except once, for the one decision the trainer must take:
whether the loss is finite. That flag is copied to the host asynchronously right after the
forward pass and read after backward has been queued, so the device keeps working meanwhile.
Logged values stay tensors (:class:`densedino.train.hooks.DeferredRuntimeInfoHook` turns them
into numbers at log intervals only).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from mmengine.logging import print_log
from mmengine.model import BaseModel, MMDistributedDataParallel
from mmengine.optim import OptimWrapper
from mmengine.registry import MODEL_WRAPPERS, MODELS
from torch import Tensor, nn

from densedino.data.collate import normalize_views
from densedino.methods import METHODS
from densedino.methods.base import SSLMethod, StepState
from densedino.train.init_from import init_from_checkpoint, parse_init_from

for _method in METHODS:
    MODELS.register_module(module=_method)


def clip_gradients(module: nn.Module, max_norm: float) -> None:
    """DINO's clipping: each parameter's gradient norm separately, not the global norm.

    ``grad *= min(1, max_norm / (||grad|| + 1e-6))`` per parameter, as DINO's
    ``utils.clip_gradients``, with multi-tensor (``torch._foreach_*``) kernels: one launch per
    op for all parameters instead of a Python loop of small ones, and no host sync.
    """
    grads = [param.grad for param in module.parameters() if param.grad is not None]
    if not grads:
        return
    scales = list(torch._foreach_norm(grads, 2))
    torch._foreach_add_(scales, 1e-6)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, max_norm)
    torch._foreach_clamp_max_(scales, 1.0)
    torch._foreach_mul_(grads, scales)


class FiniteFlag:
    """``isfinite(loss)`` on its way to the host, started without waiting for the device.

    On CUDA the flag is copied into pinned memory behind the forward pass on the current stream;
    :meth:`check` waits for that copy only (by then backward is queued, so the device stays
    busy). Elsewhere the computation is synchronous anyway and the flag is read directly.
    """

    def __init__(self, loss: Tensor) -> None:
        self.loss = loss.detach()
        finite = torch.isfinite(self.loss)
        self._event = None
        if finite.is_cuda:
            self._flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._flag.copy_(finite, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._flag = finite

    def check(self, iteration: int) -> None:
        """Raise FloatingPointError if the loss was not finite."""
        if self._event is not None:
            self._event.synchronize()
        if not bool(self._flag):
            raise FloatingPointError(f"loss is {self.loss.item()} at iteration {iteration}")


@MODELS.register_module()
class SSLModel(BaseModel):
    """Wraps an :class:`SSLMethod` (built from ``method``, e.g. ``dict(type='DenseDINO', ...)``).

    Args:
        method: config of the method.
        clip_grad: per-parameter gradient norm bound (DINO: 3.0); None disables it.
        freeze_last_layer: epochs during which the heads' last layers get no update (DINO: 1).
        init_from: fine-tune from released weights: a checkpoint path (any format
            ``load_backbone`` reads) or ``dict(path=..., which='both'|'teacher'|'student')``;
            see :mod:`densedino.train.init_from`. A resumed run's checkpoint overrides it.
    """

    def __init__(
        self,
        method: dict,
        clip_grad: float | None = 3.0,
        freeze_last_layer: int = 1,
        data_preprocessor: dict | None = None,
        init_from: str | dict | None = None,
    ) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        self.method: SSLMethod = MODELS.build(method)
        if init_from is not None:
            path, which = parse_init_from(init_from)
            report = init_from_checkpoint(self.method, path, which)
            print_log("\n".join(report.lines()), logger="current")
        self.clip_grad = clip_grad
        self.freeze_last_layer = freeze_last_layer
        self.state = StepState()
        self._last_step_end: float | None = None

    def forward(self, mode: str = "loss", **batch) -> dict[str, Tensor]:
        if mode != "loss":
            raise ValueError(f"SSLModel only trains (mode='loss'), got mode={mode!r}")
        return self.method.compute_losses(batch, self.state)

    def train_step(self, data: dict, optim_wrapper: OptimWrapper) -> dict[str, Tensor]:
        return ssl_train_step(self, self, data, optim_wrapper)


def ssl_train_step(
    forward_module: nn.Module, model: SSLModel, data: dict, optim_wrapper: OptimWrapper
) -> dict[str, Tensor]:
    """One optimisation step; ``forward_module`` is the model or its DDP wrapper."""
    with optim_wrapper.optim_context(forward_module):
        batch = normalize_views(model.data_preprocessor(data, True))
        outputs = forward_module(mode="loss", **batch)
    loss = outputs.pop("loss")
    finite = FiniteFlag(loss)
    optim_wrapper.backward(loss)
    # The trainer's one decision: nothing is updated after a non-finite loss.
    finite.check(model.state.iteration)
    student = model.method.student
    if model.clip_grad:
        scaler = getattr(optim_wrapper, "loss_scaler", None)
        if scaler is not None:
            scaler.unscale_(optim_wrapper.optimizer)
        clip_gradients(student, model.clip_grad)
    if model.state.epoch < model.freeze_last_layer:
        model.method.cancel_last_layer_gradients()
    optim_wrapper.step()
    optim_wrapper.zero_grad()
    model.method.update_teacher(model.state.momentum)
    return log_values(model, loss, outputs, batch, optim_wrapper)


def log_values(
    model: SSLModel, loss: Tensor, outputs: dict, batch: dict, optim_wrapper: OptimWrapper
) -> dict[str, Tensor]:
    """Scalars for the logger and TensorBoard, averaged over ranks like mmengine's losses."""
    values = {"loss": loss.detach(), **{k: v.detach().float() for k, v in outputs.items()}}
    corrupt = batch.get("corrupt", torch.zeros((), dtype=torch.long))
    values["corrupt"] = corrupt.to(loss.device, non_blocking=True).float().sum()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        stacked = torch.stack([v.reshape(()) for v in values.values()])
        dist.all_reduce(stacked)
        values = dict(zip(values, stacked / world, strict=True))
        values["corrupt"] = values["corrupt"] * world  # a count: the sum over ranks
    now = time.perf_counter()
    images = batch["views"][0].shape[0] * world
    if model._last_step_end is not None:
        values["images_per_s"] = torch.tensor(images / (now - model._last_step_end))
    model._last_step_end = now
    group = optim_wrapper.optimizer.param_groups[0]
    values["lr"] = torch.tensor(group["lr"])
    values["wd"] = torch.tensor(group["weight_decay"])
    values["momentum"] = torch.tensor(model.state.momentum)
    values["teacher_temp"] = torch.tensor(model.state.teacher_temp)
    return values


@MODEL_WRAPPERS.register_module()
class SSLDistributedDataParallel(MMDistributedDataParallel):
    """DDP wrapper whose step is :func:`ssl_train_step` (mmengine's default would skip DINO's
    clipping, last-layer freezing and teacher update)."""

    def train_step(self, data: dict, optim_wrapper: OptimWrapper) -> dict[str, Tensor]:
        return ssl_train_step(self, self.module, data, optim_wrapper)

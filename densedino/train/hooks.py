"""Hooks: DINO's per-iteration schedules that mmengine's schedulers do not cover, logging without
a host sync per iteration, a collapse monitor, and the backbone export at the end of training."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import torch
from mmengine.dist import get_world_size, is_main_process
from mmengine.hooks import Hook, LoggerHook, RuntimeInfoHook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.utils import apply_to

from densedino.methods.base import StepState


def dino_schedule(
    base: float, final: float, total: int, step: int, warmup: int = 0, warmup_start: float = 0.0
) -> float:
    """Value at ``step`` of DINO's ``utils.cosine_scheduler(base, final, ...)`` over ``total``
    iterations: ``np.linspace(warmup_start, base, warmup)`` then a cosine from ``base`` to
    ``final`` over the remaining ``total - warmup`` iterations."""
    if step < warmup:
        return warmup_start + (base - warmup_start) * step / max(warmup - 1, 1)
    step, span = step - warmup, max(total - warmup, 1)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / span))


def teacher_temperature(warmup: float, final: float, warmup_epochs: int, epoch: int) -> float:
    """Linear warm-up over ``warmup_epochs`` epochs (np.linspace like DINO), then constant."""
    if epoch >= warmup_epochs:
        return final
    if warmup_epochs == 1:
        return warmup
    return warmup + (final - warmup) * epoch / (warmup_epochs - 1)


def unwrap(model):
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class DINOScheduleHook(Hook):
    """DINO's per-iteration schedules, derived from the run's length so that changing
    ``train_cfg.max_epochs`` changes all of them consistently:

    - learning rate: linear warm-up to ``lr * total_batch / base_batch_size`` over
      ``warmup_epochs``, then cosine to ``min_lr`` (all parameter groups);
    - weight decay: cosine ``weight_decay`` -> ``weight_decay_end`` (group 0 only; group 1
      holds biases and norms and stays at 0);
    - teacher EMA momentum: cosine ``momentum`` -> ``momentum_end``;
    - teacher temperature: linear warm-up per epoch, then constant.
    """

    priority = "VERY_HIGH"

    def __init__(
        self,
        lr: float = 5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: int = 10,
        base_batch_size: int = 256,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        momentum: float = 0.996,
        momentum_end: float = 1.0,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
    ) -> None:
        self.lr, self.min_lr, self.warmup_epochs = lr, min_lr, warmup_epochs
        self.base_batch_size = base_batch_size
        self.weight_decay, self.weight_decay_end = weight_decay, weight_decay_end
        self.momentum, self.momentum_end = momentum, momentum_end
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        step, total = runner.iter, runner.max_iters
        loader = runner.train_dataloader
        peak_lr = self.lr * loader.batch_size * get_world_size() / self.base_batch_size
        warmup = self.warmup_epochs * len(loader)
        lr = dino_schedule(peak_lr, self.min_lr, total, step, warmup)
        wd = dino_schedule(self.weight_decay, self.weight_decay_end, total, step)
        for i, group in enumerate(runner.optim_wrapper.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        unwrap(runner.model).state = StepState(
            epoch=runner.epoch,
            iteration=step,
            teacher_temp=teacher_temperature(
                self.warmup_teacher_temp,
                self.teacher_temp,
                self.warmup_teacher_temp_epochs,
                runner.epoch,
            ),
            momentum=dino_schedule(self.momentum, self.momentum_end, total, step),
        )


# Log interval assumed when the runner has no LoggerHook.
DEFAULT_LOG_INTERVAL = 10


def log_interval(runner) -> int:
    """The interval of the runner's LoggerHook (when the logs are written)."""
    for hook in getattr(runner, "hooks", ()):
        if isinstance(hook, LoggerHook):
            return hook.interval
    return DEFAULT_LOG_INTERVAL


def to_numbers(entries: list[dict]) -> list[dict]:
    """``entries`` with every tensor replaced by a Python number, in one device -> host
    transfer per device (not one per value)."""
    by_device: dict[torch.device, list[tuple[int, str, torch.Tensor]]] = {}
    for i, entry in enumerate(entries):
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                by_device.setdefault(value.device, []).append((i, key, value))
    numbers = [dict(entry) for entry in entries]
    for items in by_device.values():
        stacked = torch.stack([v.detach().reshape(()).double() for _, _, v in items])
        for (i, key, _), number in zip(items, stacked.tolist(), strict=True):
            numbers[i][key] = number
    return numbers


class DeferredLogging:
    """Buffers per-iteration tensors and turns them into numbers when the logger needs them:
    every ``interval`` batches (the LoggerHook's), at the end of an epoch, and on demand."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, dict]] = []
        self.interval: int | None = None

    def add(self, iteration: int, values: dict) -> None:
        self.pending.append((iteration, values))

    def due(self, runner, batch_idx: int) -> bool:
        if self.interval is None:
            self.interval = log_interval(runner)
        loader = getattr(runner, "train_dataloader", None)
        end_of_epoch = loader is not None and batch_idx + 1 == len(loader)
        return (batch_idx + 1) % self.interval == 0 or end_of_epoch

    def take(self) -> list[tuple[int, dict]]:
        """The buffered (iteration, values) with numbers in place of tensors; empties the buffer."""
        iterations = [i for i, _ in self.pending]
        values = to_numbers([v for _, v in self.pending])
        self.pending = []
        return list(zip(iterations, values, strict=True))


@HOOKS.register_module()
class DeferredRuntimeInfoHook(RuntimeInfoHook):
    """mmengine's ``RuntimeInfoHook`` without a host sync per logged value and iteration.

    mmengine's hook hands every output of every step to the message hub, which calls
    ``.item()`` on each: about ten device syncs per iteration. This one keeps the outputs as
    tensors and hands them over, all at once and in order, when the LoggerHook is about to read
    them (every ``interval`` batches, the end of an epoch) and before a checkpoint stores the
    message hub, so the logged values and averaging windows are the same as mmengine's.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deferred = DeferredLogging()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if outputs is not None:
            self.deferred.add(runner.iter, {k: _detached(v) for k, v in outputs.items()})
        if self.deferred.due(runner, batch_idx):
            self.flush(runner)

    def flush(self, runner) -> None:
        """Hand the buffered values to the message hub."""
        for _, values in self.deferred.take():
            for key, value in values.items():
                runner.message_hub.update_scalar(f"train/{key}", value)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.deferred.pending:
            self.flush(runner)
            checkpoint["message_hub"] = apply_to(
                runner.message_hub.state_dict(), lambda x: hasattr(x, "cpu"), lambda x: x.cpu()
            )

    def after_train(self, runner) -> None:
        self.flush(runner)
        super().after_train(runner)


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


@HOOKS.register_module()
class CollapseMonitorHook(Hook):
    """Warns when the teacher collapses and keeps the count of skipped (corrupt) images.

    Collapse: ``feature_std`` (spread of the L2-normalised teacher features, ~1 when healthy)
    below ``min_feature_std``, or ``teacher_entropy`` (normalised, 1 = uniform) above
    ``max_entropy``, after ``warmup_iters`` iterations.

    Stall: at the end of each epoch, the mean ``teacher_entropy`` of the last ``stall_window``
    iterations above ``stall_entropy``. Not a collapse (the student still follows the teacher),
    but the targets carry little information and the backbone learns slowly: the regime in
    which the CPU demo runs stay (docs/benchmarks.md). It is logged, not counted as collapse.

    The step's values are read as numbers at log intervals only (the LoggerHook's, end of
    epoch, end of training), all buffered iterations at once, so the monitor adds no host sync
    per iteration; a warning therefore comes at most one log interval late.
    """

    priority = "LOW"
    _KEYS = ("corrupt", "feature_std", "teacher_entropy")

    def __init__(
        self,
        min_feature_std: float = 0.05,
        max_entropy: float = 0.995,
        warmup_iters: int = 20,
        stall_entropy: float = 0.9,
        stall_window: int = 50,
    ) -> None:
        self.min_feature_std = min_feature_std
        self.max_entropy = max_entropy
        self.warmup_iters = warmup_iters
        self.stall_entropy = stall_entropy
        self.recent_entropy: deque[float] = deque(maxlen=stall_window)
        self.corrupt = 0
        self.collapsed_iters = 0
        self.stalled_epochs = 0
        self.deferred = DeferredLogging()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if outputs:
            values = {k: _detached(outputs[k]) for k in self._KEYS if k in outputs}
            self.deferred.add(runner.iter, values)
        if self.deferred.due(runner, batch_idx):
            self.flush(runner)

    def flush(self, runner) -> None:
        """Check the buffered iterations, in order."""
        for iteration, values in self.deferred.take():
            self.check(runner, iteration, values)
        runner.message_hub.update_info("corrupt_images_total", self.corrupt)

    def check(self, runner, iteration: int, values: dict) -> None:
        """Count corrupt images, record the entropy and warn on collapse for one iteration."""
        self.corrupt += round(values.get("corrupt", 0))
        std = values.get("feature_std", 1.0)
        entropy = values.get("teacher_entropy", 0.0)
        if iteration < self.warmup_iters:
            return
        if "teacher_entropy" in values:
            self.recent_entropy.append(entropy)
        if std < self.min_feature_std or entropy > self.max_entropy:
            self.collapsed_iters += 1
            if self.collapsed_iters == 1 or self.collapsed_iters % 100 == 0:
                runner.logger.warning(
                    f"COLLAPSE WARNING at iter {iteration}: teacher feature_std={std:.4f} "
                    f"(healthy ~1, bound {self.min_feature_std}), teacher_entropy={entropy:.4f} "
                    f"(1 = uniform, bound {self.max_entropy}). Check lr, teacher temperature, "
                    "centering momentum."
                )

    def after_train_epoch(self, runner) -> None:
        self.flush(runner)
        if self.corrupt:
            runner.logger.warning(f"{self.corrupt} unreadable images skipped so far")
        if self.recent_entropy and self.mean_recent_entropy() > self.stall_entropy:
            self.stalled_epochs += 1
            runner.logger.warning(
                f"teacher nearly uniform: mean teacher_entropy {self.mean_recent_entropy():.3f} "
                f"over the last {len(self.recent_entropy)} iterations (bound "
                f"{self.stall_entropy}); the targets carry little information and the backbone "
                "learns slowly. Normal in the first epochs of a long run; if it persists, try "
                "more iterations or a lower teacher temperature (docs/benchmarks.md)."
            )

    def mean_recent_entropy(self) -> float:
        return sum(self.recent_entropy) / len(self.recent_entropy)

    def after_run(self, runner) -> None:
        self.flush(runner)
        runner.logger.info(
            f"training done: {self.corrupt} unreadable images skipped, "
            f"{self.collapsed_iters} iterations flagged as collapsed, "
            f"{self.stalled_epochs} epochs with a nearly uniform teacher"
        )


@HOOKS.register_module()
class ExportBackboneHook(Hook):
    """Exports the teacher backbone (safetensors + JSON metadata) when training ends."""

    priority = "VERY_LOW"

    def __init__(self, out_dir: str = "export") -> None:
        self.out_dir = out_dir

    def after_train(self, runner) -> None:
        if not is_main_process():
            return
        from densedino.train.export import export_method

        out = Path(runner.work_dir) / self.out_dir
        method = unwrap(runner.model).method
        paths = export_method(method, out, epoch=runner.epoch, config=runner.cfg.pretty_text)
        runner.logger.info(f"exported backbone: {', '.join(str(p) for p in paths)}")

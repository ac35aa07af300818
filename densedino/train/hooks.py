"""Hooks: DINO's per-iteration schedules that mmengine's schedulers do not cover, a collapse
monitor, and the backbone export at the end of training."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

from mmengine.dist import get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

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
    """

    priority = "LOW"

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

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not outputs:
            return
        self.corrupt += round(float(outputs.get("corrupt", 0)))
        runner.message_hub.update_info("corrupt_images_total", self.corrupt)
        std = float(outputs.get("feature_std", 1.0))
        entropy = float(outputs.get("teacher_entropy", 0.0))
        if runner.iter < self.warmup_iters:
            return
        if "teacher_entropy" in outputs:
            self.recent_entropy.append(entropy)
        if std < self.min_feature_std or entropy > self.max_entropy:
            self.collapsed_iters += 1
            if self.collapsed_iters == 1 or self.collapsed_iters % 100 == 0:
                runner.logger.warning(
                    f"COLLAPSE WARNING at iter {runner.iter}: teacher feature_std={std:.4f} "
                    f"(healthy ~1, bound {self.min_feature_std}), teacher_entropy={entropy:.4f} "
                    f"(1 = uniform, bound {self.max_entropy}). Check lr, teacher temperature, "
                    "centering momentum."
                )

    def after_train_epoch(self, runner) -> None:
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

"""Helpers of the tests that train through the real CLI (imported by file name: a dependency
ships a top-level ``tests`` package, so ``tests.*`` imports would pick up the wrong one)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# A demo config scaled down for a CLI test: 2 blocks, 32 px views (4 x 4 patches), batches of 16.
# The demo's learning rate when these tests were written is pinned, so that retuning the demo
# recipe does not silently change what they measure.
_SMALL_RUN_CONFIG = """
_base_ = ["{root}/configs/demo/{demo}"]
model = dict(method=dict({method}backbone=dict(img_size=32, depth=2)))
train_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(views=dict(global_size=32, local_size=32)),
)
schedule = dict(lr=2e-3, warmup_epochs=1)
log_processor = dict(window_size=1)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1000))
custom_hooks = [dict(type="CollapseMonitorHook", warmup_iters=0), dict(type="ExportBackboneHook")]
"""


def small_run_config(demo: str, method_options: str = "") -> str:
    """Text of `configs/demo/<demo>` scaled down for a CLI test; `method_options` (e.g.
    ``"queue_len=64, "``) go into ``model.method`` before the backbone."""
    return _SMALL_RUN_CONFIG.format(root=ROOT, demo=demo, method=method_options)


def launch(
    *cmd: object, one_thread: bool = True, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root (on one thread unless told otherwise, so that
    tests running side by side do not oversubscribe the cores; `env` adds variables) and return
    it finished, whatever its exit status; fail after `timeout` seconds."""
    extra = {"OMP_NUM_THREADS": "1"} if one_thread else {}
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **extra, **(env or {})},
    )


def run(
    *cmd: object, one_thread: bool = True, timeout: float = 600, env: dict | None = None
) -> str:
    """:func:`launch`, then fail with the end of its output unless it exited 0; its output."""
    proc = launch(*cmd, one_thread=one_thread, timeout=timeout, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-6000:]}"
    return output


def logged_by_step(work_dir: Path, key: str) -> dict[int, float]:
    """Per-iteration values of ``key`` written by mmengine's LoggerHook (every run in the work
    dir), keyed by step."""
    values: dict[int, float] = {}
    for path in sorted(work_dir.glob("*/vis_data/*.json")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if key in record and "step" in record and "lr" in record:
                values[int(record["step"])] = float(record[key])
    return values


def logged(work_dir: Path, key: str) -> list[float]:
    """Per-iteration values of ``key``, in step order."""
    values = logged_by_step(work_dir, key)
    return [values[step] for step in sorted(values)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def assert_export_evaluates(export: Path, data: object, work: Path) -> None:
    """An exported backbone goes through k-NN and the seg probe on a 100-image built-in dataset
    (``data``: the DemoDatasetInfo it was written with)."""
    from densedino.evaluation import knn_cli
    from densedino.evaluation.seg import cli as seg_cli

    knn_out = work / "knn.json"
    argv = ["--checkpoint", export, "--data", data.imagenet_train.parent, "--crop", "32",
            "--k", "1", "5", "--batch-size", "50", "--workers", "0", "--out", knn_out,
            "--quiet"]  # fmt: skip
    assert knn_cli.main([str(a) for a in argv]) == 0
    knn = json.loads(knn_out.read_text())
    assert knn["train"]["used"] == 80 and knn["val"]["used"] == 20
    assert all(0 <= acc["top1"] <= acc["top5"] <= 100 for acc in knn["results"].values())
    argv = ["--checkpoint", export, "--data", data.voc_root, "--work-dir", work / "seg",
            "--protocol", "demo", "--crop-size", "64", "--workers", "0", "--grid", "0",
            "--epochs", "1"]  # fmt: skip
    assert seg_cli.main([str(a) for a in argv]) == 0
    seg = json.loads((work / "seg" / "seg_results.json").read_text())
    assert seg["val"]["images"] == 20 and 0 <= seg["mIoU"] <= 100

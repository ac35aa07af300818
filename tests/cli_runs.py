"""Helpers of the tests that train through the real CLI (imported by file name: a dependency
ships a top-level ``tests`` package, so ``tests.*`` imports would pick up the wrong one)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: object) -> str:
    """Run a command from the repository root on one thread; fail with the end of its output."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-4000:]}"
    return output


def logged(work_dir: Path, key: str) -> list[float]:
    """Per-iteration values of ``key`` written by mmengine's LoggerHook, in step order."""
    values: dict[int, float] = {}
    for path in sorted(work_dir.glob("*/vis_data/*.json")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if key in record and "step" in record and "lr" in record:
                values[int(record["step"])] = float(record[key])
    return [values[step] for step in sorted(values)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)

"""The main job (`python -m densedino.cli.pipeline`) on a shortened run, twice with the same seed:
the results and figures must come out identical.

96 images -> 76 train images -> 2 iterations of 32 per epoch (the first at lr 0, the second
moves the weights), one epoch of pretraining per method, one epoch of the VOC probe. About
2 minutes per run on 2 CPU cores, most of it spent starting the stages' processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from densedino.demo_job import METHODS

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("random-init", *METHODS)
FIGURES = (
    "loss_curves.png",
    "attention_maps.png",
    *(f"seg_predictions_{model}.png" for model in MODELS),
)
TINY = ["--num-images", "96", "--epochs", "1", "--seg-epochs", "1", "--figure-images", "2"]

TIMEOUT = 600
# One compute thread per process: two runs share the 2 cores (as other slow tests do).
ENV = {"OMP_NUM_THREADS": "1"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * TIMEOUT)]


def start_pipeline(work_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "densedino.cli.pipeline", "--work-dir", str(work_dir), *TINY]
    with log_path(work_dir).open("w") as log:  # the child keeps its own handle
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV}
        )


def log_path(work_dir: Path) -> Path:
    return work_dir.parent / f"{work_dir.name}.log"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Both runs at once: about half the wall time on 2 cores (much of a run is single-threaded
    process start-up), and timing-dependent nondeterminism gets a chance to show."""
    root = tmp_path_factory.mktemp("pipeline")
    work_dirs = (root / "first", root / "second")
    procs = [start_pipeline(work) for work in work_dirs]
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = [log_path(work).read_text() for work in work_dirs]
    for work, proc, log in zip(work_dirs, procs, logs, strict=True):
        assert proc.returncode == 0, f"{work.name}: exit {proc.returncode}\n{log[-6000:]}"
    return *work_dirs, logs[0]


def backbone(work_dir: Path, model: str) -> dict[str, torch.Tensor]:
    if model == "random-init":
        return load_file(work_dir / "random_init" / "backbone.safetensors")
    return load_file(work_dir / model / "export" / "backbone.safetensors")


def test_results_are_identical(runs: tuple[Path, Path, str]) -> None:
    first, second, _ = runs
    results = json.loads((first / "results.json").read_text())
    assert results == json.loads((second / "results.json").read_text())
    assert list(results["knn"]) == list(MODELS)
    assert list(results["seg_miou"]) == list(MODELS)
    for model in MODELS:
        assert set(results["knn"][model]) == {"10", "20"}
        assert 0.0 <= results["seg_miou"][model] <= 100.0


def test_training_is_bitwise_reproducible(runs: tuple[Path, Path, str]) -> None:
    first, second, _ = runs
    init = backbone(first, "random-init")
    for model in MODELS:
        a, b = backbone(first, model), backbone(second, model)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), model
    for method in METHODS:  # the run trained: the teachers moved off the init
        trained = backbone(first, method)
        assert any(not torch.equal(trained[key], init[key]) for key in init), method


def test_results_table_lists_every_model_and_figure(runs: tuple[Path, Path, str]) -> None:
    first, second, stdout = runs
    text = (first / "results.md").read_text()
    assert text == (second / "results.md").read_text()
    table, _, figures = text.partition("\nFigures:\n")
    lines = table.strip().splitlines()
    assert lines[0] == "| model | k-NN top-1 (k=10) | k-NN top-1 (k=20) | VOC mIoU |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(MODELS)
    for name in FIGURES:
        assert f"(figures/{name})" in figures
        assert str(first / "figures" / name) in stdout


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_identical_pictures(runs: tuple[Path, Path, str], name: str) -> None:
    first, second, _ = runs
    path = first / "figures" / name
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 200 and image.height >= 150
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # a picture, not a blank
    assert path.read_bytes() == (second / "figures" / name).read_bytes()


def test_evaluation_commands_parse_as_densedino_eval_reads_them(tmp_path: Path) -> None:
    """The one definition of the main job's evaluation command lines (also used by
    benchmarks/replicate.py and dense_compare.py) is what `densedino-eval` accepts."""
    from densedino.demo_job import DENSE_OPTIONS, dense_command, knn_command, seg_command
    from densedino.evaluation.cli import build_parser

    ckpt, data, out, work = (
        tmp_path / "c.safetensors",
        tmp_path / "data",
        tmp_path / "o.json",
        tmp_path / "w",
    )

    def parse(command: list[str]):
        assert command[:3] == [sys.executable, "-m", "densedino.evaluation.cli"]
        return build_parser().parse_args(command[3:])

    knn = parse(knn_command(ckpt, data, out))
    assert (knn.command, knn.data, knn.crop, list(knn.k)) == (
        "knn",
        data / "imagenet",
        128,
        [10, 20],
    )
    seg = parse(seg_command(ckpt, data, out, work, seed=3, epochs=5))
    assert (seg.protocol, seg.seed, seg.epochs) == ("demo", 3, 5)
    for protocol in DENSE_OPTIONS:
        args = parse(dense_command(protocol, ckpt, data, out, work, seed=1, layer=1))
        assert (args.command, args.preset, args.layer, args.seed) == (protocol, "demo", 1, 1)
        assert parse(dense_command(protocol, ckpt, data, out, work, seed=1)).layer is None

"""benchmarks/replicate.py's pure parts: statistics and their formatting, the tables, the
variants' --cfg-options and the reuse of finished runs. Trains nothing."""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("replicate", ROOT / "benchmarks" / "replicate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


rep = load_script()


def test_mean_std_is_the_sample_std() -> None:
    mean, std = rep.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    assert std == pytest.approx(((16 / 9 + 1 / 9 + 25 / 9) / 2) ** 0.5)  # n - 1
    assert rep.mean_std([3.0]) == (3.0, None)
    with pytest.raises(ValueError):
        rep.mean_std([])


def test_format_mean_std() -> None:
    assert rep.format_mean_std([40.0, 42.0]) == "41.00 ± 1.41 (n=2)"
    assert rep.format_mean_std([40.123]) == "40.12 ± n/a (n=1)"
    assert rep.format_mean_std([]) == "—"


def test_variants_and_their_cfg_options() -> None:
    variants = rep.make_variants(2)
    assert list(variants) == ["dino-loss-only", "ref-loss-only", "both", "both-2-views"]
    assert [(v.alpha, v.num_local) for v in variants.values()] == [
        (1.0, 2),
        (0.0, 2),
        (0.5, 2),
        (0.5, 0),
    ]
    assert variants["ref-loss-only"].cfg_options(3) == [
        "model.method.alpha=0.0",
        "train_dataloader.dataset.views.num_local=2",
        "randomness.seed=3",
    ]
    assert variants["both"].label(2) == "both (2+2 views)"
    assert variants["both-2-views"].label(2) == "both-2-views (2 views)"
    # a recipe without local views is compared against 2 extra ones
    no_local = rep.make_variants(0)
    assert no_local["both"].num_local == 0
    assert no_local["both-4-views"].num_local == 2


def test_iterations() -> None:
    assert rep.iterations(51, 32, 1) == 1
    assert rep.iterations(1600, 32, 6) == 300


def test_variants_follow_the_recipe() -> None:
    recipe = rep.load_recipe()
    variants = rep.make_variants(recipe.num_local)
    assert all(v.num_local == recipe.num_local for v in list(variants.values())[:3])
    assert len(recipe.fingerprint) == 16


def numbers() -> dict[str, dict[int, dict]]:
    return {
        "random-init": {0: {"knn_top1": 10.0, "miou": 5.0}, 1: {"knn_top1": 12.0, "miou": 6.0}},
        "dino-loss-only": {
            0: {"knn_top1": 40.0, "miou": 20.0},
            1: {"knn_top1": 44.0, "miou": None},
        },
        "both": {0: {"knn_top1": 41.0, "miou": 22.0}, 1: {"knn_top1": 46.0, "miou": 24.0}},
    }


def test_results_table() -> None:
    labels = {"both": "both (2+2 views)"}
    lines = rep.results_table(numbers(), labels).splitlines()
    assert len(lines) == 2 + 3
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 6
    assert lines[2] == (
        "| random-init | 11.00 ± 1.41 (n=2) | 5.50 ± 0.71 (n=2) | s0 10.00, s1 12.00 "
        "| s0 5.00, s1 6.00 |"
    )
    # a seed without the probe: the mIoU over the one seed that has it
    assert "| 20.00 ± n/a (n=1) |" in lines[3]
    assert lines[4].startswith("| both (2+2 views) | 43.50 ± 3.54 (n=2) | 23.00 ± 1.41 (n=2) |")


def test_differences_table_pairs_seeds() -> None:
    lines = rep.differences_table(numbers(), {}).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert list(rows) == [
        "both - dino-loss-only",
        "dino-loss-only - random-init",
        "both - random-init",
    ]
    # both - dino: k-NN differences 1 and 2; mIoU only seed 0 has both: 2
    assert "| 1.50 ± 0.71 (n=2) | 2.00 ± n/a (n=1) |" in rows["both - dino-loss-only"]


def test_contrasts() -> None:
    names = ["random-init", "dino-loss-only", "ref-loss-only", "both", "both-2-views"]
    pairs = rep.contrasts(names)
    assert pairs[:4] == [
        ("both", "dino-loss-only"),
        ("both", "ref-loss-only"),
        ("dino-loss-only", "ref-loss-only"),
        ("both", "both-2-views"),
    ]
    assert ("ref-loss-only", "random-init") in pairs
    assert rep.contrasts(["both", "random-init"]) == [("both", "random-init")]


def test_metrics_takes_the_miou_of_the_wanted_probe_only() -> None:
    result = {"knn_top1": 40.0, "seg": {"epochs": 3, "mIoU": 20.0}}
    assert rep.metrics(result, 3) == {"knn_top1": 40.0, "miou": 20.0}
    assert rep.metrics(result, 1) == {"knn_top1": 40.0, "miou": None}
    assert rep.metrics(result, None) == {"knn_top1": 40.0, "miou": None}


SETTINGS = {"variant": "both", "alpha": 0.5, "num_local": 2, "seed": 1, "epochs": 6}


def finished(settings: dict) -> dict:
    return {
        "settings": settings,
        "knn": {"20": {"top1": 41.0, "top5": 90.0}},
        "knn_top1": 41.0,
        "miou": 22.0,
        "seg": {"epochs": 3, "seed": 1, "mIoU": 22.0},
        "times": {"train_s": 200.0, "knn_s": 10.0, "seg_s": 90.0},
    }


def test_is_complete() -> None:
    result = finished(SETTINGS)
    assert rep.is_complete(result, SETTINGS, 3)
    assert rep.is_complete(result, SETTINGS, None)  # k-NN only wanted
    assert not rep.is_complete(result, SETTINGS, 5)  # another probe length
    assert not rep.is_complete(result, {**SETTINGS, "seed": 2}, 3)
    assert not rep.is_complete(None, SETTINGS, 3)
    assert not rep.is_complete({**result, "knn_top1": None}, SETTINGS, None)
    assert not rep.is_complete({**result, "seg": None}, SETTINGS, 3)


def test_prepare_run_reuses_or_restarts(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "both" / "seed1"
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps(SETTINGS))
    (folder / "result.json").write_text(json.dumps(finished(SETTINGS)))
    (folder / "epoch_6.pth").write_text("checkpoint")
    assert rep.prepare_run(folder, SETTINGS) == finished(SETTINGS)
    assert (folder / "epoch_6.pth").is_file()

    changed = {**SETTINGS, "epochs": 8}
    fresh = rep.prepare_run(folder, changed)
    assert fresh["settings"] == changed and fresh["knn_top1"] is None and fresh["times"] == {}
    assert not (folder / "epoch_6.pth").exists()  # trained with other settings: removed
    assert json.loads((folder / "settings.json").read_text()) == changed


def run_context(tmp_path: Path, seg_epochs: int | None) -> argparse.Namespace:
    return argparse.Namespace(
        work_dir=tmp_path, data=tmp_path / "data", epochs=None, seg_epochs=seg_epochs
    )


def test_run_variant_reuses_a_finished_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(rep, "call", fail)
    folder = rep.run_dir(tmp_path, "both", 1)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(finished(SETTINGS)))
    variant = rep.make_variants(2)["both"]
    result = rep.run_variant(variant, 1, SETTINGS, run_context(tmp_path, 3), "[3/12]")
    assert result["knn_top1"] == 41.0
    assert "[3/12] both seed 1: reused" in capsys.readouterr().out


def test_run_variant_adds_only_the_missing_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A k-NN-only run (--no-seg) later asked for the probe: no training, no k-NN again."""
    calls = []

    def fake_seg(checkpoint, folder, data, seed, epochs):
        calls.append(("seg", seed, epochs))
        return {"mIoU": 25.0}, 1.0

    monkeypatch.setattr(rep, "call", lambda *a, **k: pytest.fail("trained or ran k-NN again"))
    monkeypatch.setattr(rep, "seg", fake_seg)
    folder = rep.run_dir(tmp_path, "both", 1)
    (folder / "export").mkdir(parents=True)
    (folder / "export" / "backbone.safetensors").write_text("weights")
    knn_only = {**finished(SETTINGS), "miou": None, "seg": None}
    (folder / "result.json").write_text(json.dumps(knn_only))
    variant = rep.make_variants(2)["both"]
    result = rep.run_variant(variant, 1, SETTINGS, run_context(tmp_path, 4), "[1/1]")
    assert calls == [("seg", 1, 4)]
    assert result["miou"] == 25.0 and result["seg"]["epochs"] == 4
    assert json.loads((folder / "result.json").read_text())["miou"] == 25.0


def test_stage_seconds() -> None:
    results = {"both": {0: finished(SETTINGS), 1: finished(SETTINGS)}, "random-init": {0: {}}}
    assert rep.stage_seconds(results) == {"train_s": 400.0, "knn_s": 20.0, "seg_s": 180.0}


def test_check_recipe_stops_when_the_recipe_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = rep.load_recipe()
    rep.check_recipe(recipe.fingerprint)
    changed = rep.Recipe(2, 2, 6, 0.5, 32, "0" * 16)
    monkeypatch.setattr(rep, "load_recipe", lambda: changed)
    with pytest.raises(SystemExit, match="changed"):
        rep.check_recipe(recipe.fingerprint)

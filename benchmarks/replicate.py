"""The DenseDINO paper's Table 3 question at small scale (issue #10): DINO loss only vs reference
loss only vs both, and the effect of extra views, on the built-in multi-object data, over several
training seeds (mean, sample std and per-seed values reported as measured).

Usage: python benchmarks/replicate.py [--variants dino-loss-only ref-loss-only both both-2-views]
       [--seeds 0 1 2] [--epochs E] [--num-images 2000] [--seg-epochs E] [--no-seg]
       [--work-dir work_dirs/replicate]

Every run trains the DenseDINO demo recipe (configs/demo/densedino_vit-t_demo.py) with only
``model.method.alpha`` (weight of the CLS loss), ``train_dataloader.dataset.views.num_local``
and ``randomness.seed`` overridden (plus ``--epochs``), through ``densedino-train``; its exported
backbone is scored with k-NN (top-1 at k=20, crop 128, as the main job does) and the VOC demo
probe (mIoU, the probe seeded with the run's seed). One random-init baseline per seed. The data
is generated once, with data seed 0, and shared by all runs: only the training seed varies.

Variants: ``dino-loss-only`` (alpha 1), ``ref-loss-only`` (alpha 0), ``both`` (alpha 0.5, the
paper's), all at the recipe's views (2 global + N local), and ``both`` at the other view count:
``both-2-views`` (num_local 0) when the recipe has N > 0 local views, else ``both-4-views``.

Writes WORK_DIR/replicate.json (every run's numbers and wall times, the settings, the commit and
the machine) and WORK_DIR/replicate.md (the table). Re-running continues where it stopped: a
run's result.json (WORK_DIR/runs/VARIANT/seedS) is reused while its settings and the recipe are
unchanged, an interrupted training resumes from its last checkpoint, and a run whose settings
changed is started again from scratch. Each stage's output goes to a log in the run's folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from densedino.demo_job import KNN_CROP, default_seg_epochs, knn_command, seg_command

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo/densedino_vit-t_demo.py"
DATA_SEED = 0
KNN_REPORT_K = 20
BASELINE = "random-init"
RESULT = "result.json"
SETTINGS = "settings.json"
CHECKPOINT = Path("export") / "backbone.safetensors"


@dataclass(frozen=True)
class Variant:
    """A training variant: its name, the CLS-loss weight alpha and the local views."""

    name: str
    alpha: float
    num_local: int

    def label(self, num_global: int) -> str:
        views = f"{num_global}+{self.num_local}" if self.num_local else str(num_global)
        return f"{self.name} ({views} views)"

    def cfg_options(self, seed: int) -> list[str]:
        """The --cfg-options that make this variant out of the recipe (data root and epochs
        are added by the caller)."""
        return [
            f"model.method.alpha={self.alpha}",
            f"train_dataloader.dataset.views.num_local={self.num_local}",
            f"randomness.seed={seed}",
        ]


def make_variants(recipe_num_local: int) -> dict[str, Variant]:
    """The four variants for a recipe with ``recipe_num_local`` local views."""
    other_local = 0 if recipe_num_local > 0 else 2
    both_other = f"both-{2 + other_local}-views"
    return {
        "dino-loss-only": Variant("dino-loss-only", 1.0, recipe_num_local),
        "ref-loss-only": Variant("ref-loss-only", 0.0, recipe_num_local),
        "both": Variant("both", 0.5, recipe_num_local),
        both_other: Variant(both_other, 0.5, other_local),
    }


@dataclass(frozen=True)
class Recipe:
    """What the script reads from the demo config."""

    num_global: int
    num_local: int
    epochs: int
    alpha: float
    batch_size: int
    fingerprint: str  # changes whenever any recipe value changes


def load_recipe(config: Path = REPO / CONFIG) -> Recipe:
    from mmengine.config import Config

    cfg = Config.fromfile(config)
    views = cfg.train_dataloader.dataset.views
    text = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    return Recipe(
        num_global=int(views.num_global),
        num_local=int(views.num_local),
        epochs=int(cfg.train_cfg.max_epochs),
        alpha=float(cfg.model.method.alpha),
        batch_size=int(cfg.train_dataloader.batch_size),
        fingerprint=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


def iterations(train_images: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps of a run (the loader drops the last partial batch)."""
    return train_images // batch_size * epochs


def warn_if_too_short(data: Path, recipe: Recipe, epochs: int) -> None:
    """The schedule's first step is at lr 0: with fewer than 2 steps the weights stay at init."""
    images = sum(1 for path in (data / "imagenet" / "train").rglob("*") if path.is_file())
    steps = iterations(images, recipe.batch_size, epochs)
    if steps < 2:
        print(
            f"warning: {images} training images, batch {recipe.batch_size}, {epochs} epochs: "
            f"{steps} step(s), the first at lr 0, so the trained backbones equal their "
            "initialisation (a plumbing check only)",
            flush=True,
        )


def parse_args(argv: Sequence[str] | None, variant_names: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", choices=variant_names, default=variant_names)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--num-images", type=int, default=2000, help="built-in dataset size")
    parser.add_argument("--seg-epochs", type=int, help="VOC probe length (default: the demo's)")
    parser.add_argument("--no-seg", action="store_true", help="k-NN only (faster)")
    parser.add_argument("--work-dir", type=Path, default=Path("work_dirs/replicate"))
    args = parser.parse_args(argv)
    for name in ("epochs", "num_images", "seg_epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds must be distinct and >= 0, got {args.seeds}")
    args.variants = list(dict.fromkeys(args.variants))
    return args


# ---------------------------------------------------------------------------------------------
# Statistics and the table


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    if not values:
        raise ValueError("no values")
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def format_mean_std(values: Sequence[float]) -> str:
    """``"41.25 ± 1.30 (n=3)"``, ``"41.25 ± n/a (n=1)"``, or ``"—"`` with no values."""
    if not values:
        return "—"
    mean, std = mean_std(values)
    spread = "n/a" if std is None else f"{std:.2f}"
    return f"{mean:.2f} ± {spread} (n={len(values)})"


def per_seed(values: dict[int, float]) -> str:
    """``"s0 40.10, s1 41.20"``, or ``"—"``."""
    return ", ".join(f"s{seed} {value:.2f}" for seed, value in sorted(values.items())) or "—"


def metric_by_seed(results: dict[int, dict], metric: str) -> dict[int, float]:
    """``{seed: value}`` of a metric (``knn_top1`` or ``miou``) over the seeds that have it."""
    return {seed: r[metric] for seed, r in results.items() if r.get(metric) is not None}


def metrics(result: dict, seg_epochs: int | None) -> dict[str, float | None]:
    """The two numbers of a stored run; the mIoU only from a probe of ``seg_epochs`` epochs."""
    probe = result.get("seg") or {}
    miou = (
        probe.get("mIoU") if seg_epochs is not None and probe.get("epochs") == seg_epochs else None
    )
    return {"knn_top1": result.get("knn_top1"), "miou": miou}


def results_table(results: dict[str, dict[int, dict]], labels: dict[str, str]) -> str:
    """Markdown: one row per model, mean ± std over seeds and the per-seed values.

    ``results[model][seed]`` holds ``knn_top1`` and ``miou`` (None when not measured).
    """
    header = (
        f"| variant | k-NN top-1 (k={KNN_REPORT_K}), mean ± std (n seeds) | VOC mIoU, mean ± std "
        "(n seeds) | k-NN per seed | mIoU per seed |"
    )
    lines = [header, "|---" * 5 + "|"]
    for model, by_seed in results.items():
        knn_values = metric_by_seed(by_seed, "knn_top1")
        miou_values = metric_by_seed(by_seed, "miou")
        cells = [
            labels.get(model, model),
            format_mean_std(list(knn_values.values())),
            format_mean_std(list(miou_values.values())),
            per_seed(knn_values),
            per_seed(miou_values),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contrasts(variant_names: Sequence[str]) -> list[tuple[str, str]]:
    """The paired comparisons (a, b) that answer the question, among the models present."""
    other = [name for name in variant_names if name.startswith("both-")]
    wanted = [
        ("both", "dino-loss-only"),
        ("both", "ref-loss-only"),
        ("dino-loss-only", "ref-loss-only"),
        *(("both", name) for name in other),
        *((name, BASELINE) for name in variant_names if name != BASELINE),
    ]
    present = set(variant_names)
    return [(a, b) for a, b in wanted if a in present and b in present]


def differences_table(results: dict[str, dict[int, dict]], labels: dict[str, str]) -> str:
    """Markdown: per-seed differences a - b (same training seed), mean ± std over seeds."""
    lines = [
        "| a - b (same seed) | k-NN top-1 difference | mIoU difference |",
        "|---|---|---|",
    ]
    for a, b in contrasts(list(results)):
        cells = [f"{labels.get(a, a)} - {labels.get(b, b)}"]
        for metric in ("knn_top1", "miou"):
            va, vb = metric_by_seed(results[a], metric), metric_by_seed(results[b], metric)
            cells.append(format_mean_std([va[s] - vb[s] for s in sorted(va.keys() & vb.keys())]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Runs, resumable


def run_dir(work_dir: Path, model: str, seed: int) -> Path:
    return work_dir / "runs" / model / f"seed{seed}"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    """Written to a sibling then renamed: an interrupted write never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def is_complete(result: dict | None, settings: dict, seg_epochs: int | None) -> bool:
    """Whether a stored result answers these settings: same training settings, k-NN done, and
    (unless ``seg_epochs`` is None) the probe done with that many epochs."""
    if not result or result.get("settings") != settings or result.get("knn_top1") is None:
        return False
    return seg_epochs is None or (result.get("seg") or {}).get("epochs") == seg_epochs


def prepare_run(folder: Path, settings: dict) -> dict:
    """The run's stored result when its settings match (possibly partial: k-NN without the
    probe), else an empty one. A folder trained with other settings is removed first."""
    stored = read_json(folder / SETTINGS)
    if stored is not None and stored != settings:
        print(f"  settings changed since the stored run: starting {folder} again", flush=True)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / SETTINGS, settings)
    result = read_json(folder / RESULT)
    if result and result.get("settings") == settings:
        return result
    return {"settings": settings, "knn_top1": None, "miou": None, "seg": None, "times": {}}


def call(cmd: list[str], log: Path) -> float:
    """Runs a CLI with its output in ``log``; seconds taken. On failure the log's tail is shown."""
    start = time.perf_counter()
    with log.open("w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n(log {log})\n{tail}")
    return time.perf_counter() - start


def check_recipe(fingerprint: str) -> None:
    """Stops when the recipe file changed since the start: the runs would mix two recipes. On
    rerun every run is redone with the new recipe (its fingerprint is in the run's settings)."""
    if load_recipe().fingerprint != fingerprint:
        raise SystemExit(f"{CONFIG} changed during this invocation: run again to use the new one")


def train(variant: Variant, seed: int, folder: Path, data: Path, epochs: int | None) -> float:
    options = [f"train_dataloader.dataset.root={data / 'imagenet' / 'train'}"]
    options += variant.cfg_options(seed)
    if epochs:
        options.append(f"train_cfg.max_epochs={epochs}")
    cmd = [sys.executable, "-m", "densedino.cli.train", CONFIG, "--work-dir", str(folder)]
    return call([*cmd, "--resume", "auto", "--cfg-options", *options], folder / "train.log")


def knn(checkpoint: Path, folder: Path, data: Path) -> tuple[dict, float]:
    out = folder / "knn.json"
    seconds = call(knn_command(checkpoint, data, out), folder / "knn.log")
    return json.loads(out.read_text())["results"], seconds


def seg(checkpoint: Path, folder: Path, data: Path, seed: int, epochs: int) -> tuple[dict, float]:
    out = folder / "seg.json"
    seconds = call(
        seg_command(checkpoint, data, out, folder / "seg", seed, epochs), folder / "seg.log"
    )
    return json.loads(out.read_text()), seconds


def evaluate(
    result: dict, checkpoint: Path, folder: Path, data: Path, seed: int, seg_epochs: int | None
) -> None:
    """Fills in what ``result`` lacks: k-NN, then the probe (unless ``seg_epochs`` is None)."""
    if result.get("knn_top1") is None:
        print("  k-NN ...", flush=True)
        accuracies, seconds = knn(checkpoint, folder, data)
        result["knn"] = accuracies
        result["knn_top1"] = accuracies[str(KNN_REPORT_K)]["top1"]
        result["times"]["knn_s"] = round(seconds, 1)
    if seg_epochs is not None and (result.get("seg") or {}).get("epochs") != seg_epochs:
        print("  VOC probe ...", flush=True)
        report, seconds = seg(checkpoint, folder, data, seed, seg_epochs)
        result["seg"] = {"epochs": seg_epochs, "seed": seed, "mIoU": report["mIoU"]}
        result["miou"] = report["mIoU"]
        result["times"]["seg_s"] = round(seconds, 1)
    write_json(folder / RESULT, result)


def summary_line(result: dict) -> str:
    miou = "-" if result.get("miou") is None else f"{result['miou']:.2f}"
    times = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in result["times"].items())
    return f"k-NN top-1 {result['knn_top1']:.2f}, mIoU {miou} ({times or 'reused'})"


def run_variant(
    variant: Variant, seed: int, settings: dict, ctx: argparse.Namespace, step: str
) -> dict:
    folder = run_dir(ctx.work_dir, variant.name, seed)
    result = prepare_run(folder, settings)
    if is_complete(result, settings, ctx.seg_epochs):
        print(f"{step} {variant.name} seed {seed}: reused: {summary_line(result)}", flush=True)
        return result
    checkpoint = folder / CHECKPOINT
    if not checkpoint.is_file():
        print(f"{step} {variant.name} seed {seed}: training ...", flush=True)
        check_recipe(settings["recipe"])
        seconds = train(variant, seed, folder, ctx.data, ctx.epochs)
        check_recipe(settings["recipe"])
        result["times"]["train_s"] = round(seconds, 1)
    else:
        print(f"{step} {variant.name} seed {seed}: trained already", flush=True)
    evaluate(result, checkpoint, folder, ctx.data, seed, ctx.seg_epochs)
    print(f"  {variant.name} seed {seed}: {summary_line(result)}", flush=True)
    return result


def run_baseline(
    seed: int, settings: dict, trained: Sequence[Path], ctx: argparse.Namespace, step: str
) -> dict:
    """The recipe's architecture with random weights (torch seed = the run's seed)."""
    folder = run_dir(ctx.work_dir, BASELINE, seed)
    result = prepare_run(folder, settings)
    if is_complete(result, settings, ctx.seg_epochs):
        print(f"{step} {BASELINE} seed {seed}: reused: {summary_line(result)}", flush=True)
        return result
    print(f"{step} {BASELINE} seed {seed}: building ...", flush=True)
    checkpoint = folder / CHECKPOINT
    if not checkpoint.is_file():
        source = next((path for path in trained if path.is_file()), None)
        if source is None:
            raise FileNotFoundError(f"no trained backbone of seed {seed} to copy the shape of")
        from densedino.demo_job import random_init_like

        random_init_like(source, checkpoint, seed)
    evaluate(result, checkpoint, folder, ctx.data, seed, ctx.seg_epochs)
    print(f"  {BASELINE} seed {seed}: {summary_line(result)}", flush=True)
    return result


def make_data(work_dir: Path, num_images: int) -> Path:
    """The built-in dataset, data seed 0, shared by every run (reused when already there)."""
    from densedino.demo_job import make_data as pipeline_make_data

    return pipeline_make_data(
        argparse.Namespace(work_dir=work_dir, num_images=num_images, seed=DATA_SEED)
    )


# ---------------------------------------------------------------------------------------------
# Report


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def config_modified() -> bool | None:
    """Whether the recipe file differs from the commit (it is tuned in the working tree)."""
    proc = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", CONFIG], cwd=REPO)
    return {0: False, 1: True}.get(proc.returncode)


def machine() -> dict:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def report_markdown(report: dict, table: str, differences: str) -> str:
    s = report["settings"]
    stage_text = ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in report["stage_s"].items())
    seg_text = "not run (--no-seg)" if s["seg_epochs"] is None else f"{s['seg_epochs']} epochs"
    notes = [
        f"- recipe: `{CONFIG}` (fingerprint {s['recipe_fingerprint']}, modified from the commit: "
        f"{report['config_modified']}), only alpha, num_local and the seed overridden; "
        f"{s['epochs']} epochs, {s['num_global']} global + {s['recipe_num_local']} local views",
        f"- data: the built-in data, {s['num_images']} images, generated once with data seed "
        f"{DATA_SEED} and shared by all runs; only the training seed (`randomness.seed`) varies "
        f"(seeds {', '.join(map(str, s['seeds']))}); the VOC probe is seeded with the run's seed",
        f"- k-NN: top-1 at k={KNN_REPORT_K}, crop {KNN_CROP}; VOC probe: `demo` protocol, "
        f"{seg_text}; std: sample standard deviation (n - 1), n/a for one seed",
        f"- commit {report['commit']}; machine: {report['machine']['processor']}, "
        f"{report['machine']['cpu_count']} CPUs; wall time of this invocation "
        f"{report['wall_s'] / 60:.1f} min; summed over all runs: {stage_text}",
    ]
    return "\n".join(
        ["# DINO loss vs reference loss vs both, and extra views (issue #10)", "", table, "",
         "Paired differences (same training seed):", "", differences, "", *notes, ""]
    )  # fmt: skip


def stage_seconds(results: dict[str, dict[int, dict]]) -> dict[str, float]:
    """Summed wall time of each stage (train, knn, seg) over every run, resumed runs included."""
    totals: dict[str, float] = {}
    for by_seed in results.values():
        for result in by_seed.values():
            for stage, seconds in result.get("times", {}).items():
                totals[stage] = round(totals.get(stage, 0.0) + seconds, 1)
    return totals


def write_report(ctx: argparse.Namespace, results: dict, labels: dict, wall_s: float) -> str:
    """replicate.json and replicate.md; returns the Markdown."""
    runs = {model: {str(s): r for s, r in by_seed.items()} for model, by_seed in results.items()}
    report = {
        "settings": ctx.settings,
        "commit": git_commit(),
        "config_modified": config_modified(),
        "machine": machine(),
        "wall_s": round(wall_s, 1),
        "stage_s": stage_seconds(results),
        "labels": labels,
        "runs": runs,
    }
    write_json(ctx.work_dir / "replicate.json", report)
    numbers = {
        model: {seed: metrics(r, ctx.seg_epochs) for seed, r in by_seed.items()}
        for model, by_seed in results.items()
    }
    table, differences = results_table(numbers, labels), differences_table(numbers, labels)
    text = report_markdown(report, table, differences)
    (ctx.work_dir / "replicate.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    recipe = load_recipe()
    variants = make_variants(recipe.num_local)
    args = parse_args(argv, list(variants))
    start = time.perf_counter()
    args.work_dir = args.work_dir.absolute()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.seg_epochs = None if args.no_seg else (args.seg_epochs or default_seg_epochs())
    args.data = make_data(args.work_dir, args.num_images).absolute()
    epochs = args.epochs or recipe.epochs
    warn_if_too_short(args.data, recipe, epochs)
    common = {"data_seed": DATA_SEED, "num_images": args.num_images, "recipe": recipe.fingerprint}
    args.settings = {
        "variants": args.variants, "seeds": args.seeds, "epochs": epochs,
        "num_images": args.num_images, "seg_epochs": args.seg_epochs, "data_seed": DATA_SEED,
        "recipe_fingerprint": recipe.fingerprint, "recipe_alpha": recipe.alpha,
        "num_global": recipe.num_global, "recipe_num_local": recipe.num_local,
        "knn_k": KNN_REPORT_K, "knn_crop": KNN_CROP,
    }  # fmt: skip
    chosen = [variants[name] for name in args.variants]
    labels = {v.name: v.label(recipe.num_global) for v in chosen} | {BASELINE: BASELINE}
    results: dict[str, dict[int, dict]] = {name: {} for name in [BASELINE, *args.variants]}
    total, done = len(args.seeds) * (len(chosen) + 1), 0
    for seed in args.seeds:
        for variant in chosen:
            done += 1
            settings = {
                "variant": variant.name,
                "alpha": variant.alpha,
                "num_local": variant.num_local,
                "seed": seed,
                "epochs": epochs,
                **common,
            }
            step = f"[{done}/{total}]"
            results[variant.name][seed] = run_variant(variant, seed, settings, args, step)
        done += 1
        trained = [run_dir(args.work_dir, v.name, seed) / CHECKPOINT for v in chosen]
        settings = {"variant": BASELINE, "seed": seed, **common}
        results[BASELINE][seed] = run_baseline(seed, settings, trained, args, f"[{done}/{total}]")
        write_report(args, results, labels, time.perf_counter() - start)
    text = write_report(args, results, labels, time.perf_counter() - start)
    print("\n" + text)
    print(f"written: {args.work_dir / 'replicate.md'} and {args.work_dir / 'replicate.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

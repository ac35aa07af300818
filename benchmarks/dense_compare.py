"""Does the reference loss change dense features? (issue #20, item 6)

DINO and DenseDINO trained with the same budget (the demo recipes at ``--epochs``, 30 by
default: the budget at which k-NN clearly beats random init), paired by training seed, against
random init of the same seed, on the built-in data with ``class`` appearance (colour and texture
follow the class most of the time) and ``random`` appearance (they carry no class), scored with
the dense protocols (hbird, cluster, corr at their ``demo`` presets, as ``make demo`` runs them)
on the last block's features and on an intermediate block's, plus k-NN for context.

Usage: python benchmarks/dense_compare.py [--appearances class random] [--seeds 0 1 2]
       [--epochs 30] [--layers -1 1] [--num-images 2000] [--work-dir work_dirs/dense_compare]

Runs go seed by seed (every appearance and method of seed 0 first), so an interrupted
comparison holds complete pairs. Re-running continues where it stopped: a training resumes
from its last checkpoint and finished evaluations are reused. Writes WORK_DIR/dense_compare.json
(every figure per seed, wall times, the commit) and WORK_DIR/dense_compare.md (mean ± std over
seeds and the paired differences).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from replicate import call, format_mean_std, git_commit, read_json, write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from densedino.demo_job import (  # noqa: E402
    DENSE_OPTIONS,
    METHODS,
    dense_command,
    knn_command,
    random_init_like,
)

DATA_SEED = 0
MODELS = ("random-init", "dino", "densedino")
CONTRASTS = (("densedino", "dino"), ("dino", "random-init"), ("densedino", "random-init"))
CHECKPOINT = Path("export") / "backbone.safetensors"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--appearances", nargs="+", default=["class", "random"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="pretraining epochs (both methods)")
    parser.add_argument(
        "--layers", nargs="+", type=int, default=[-1, 1], help="block indices to read features"
    )
    parser.add_argument("--num-images", type=int, default=2000, help="built-in dataset size")
    parser.add_argument("--work-dir", type=Path, default=Path("work_dirs/dense_compare"))
    parser.add_argument("--report-only", action="store_true", help="tables from stored results")
    return parser.parse_args(argv)


def make_data(work_dir: Path, appearance: str, num_images: int) -> Path:
    from densedino.data import write_demo_dataset

    root = work_dir / f"data_{appearance}"
    meta = read_json(root / "meta.json") or {}
    if meta.get("appearance") != appearance or meta.get("num_images") != num_images:
        write_demo_dataset(root, num_images, DATA_SEED, appearance=appearance, overwrite=True)
    return root


def checkpoint_for(
    model: str, seed: int, folder: Path, data: Path, epochs: int, reference: Path | None
) -> tuple[Path, float]:
    """The model's exported backbone, trained (or resumed) when missing; seconds spent."""
    target = folder / CHECKPOINT
    if target.is_file():
        return target, 0.0
    if model == "random-init":
        assert reference is not None, "random init copies a trained model's architecture"
        folder.mkdir(parents=True, exist_ok=True)
        return random_init_like(reference, folder / "backbone.safetensors", seed), 0.0
    options = [
        f"train_dataloader.dataset.root={data / 'imagenet' / 'train'}",
        f"randomness.seed={seed}",
        f"train_cfg.max_epochs={epochs}",
        "default_hooks.checkpoint.interval=5",
    ]
    cmd = [sys.executable, "-m", "densedino.cli.train", METHODS[model], "--work-dir", str(folder)]
    folder.mkdir(parents=True, exist_ok=True)
    seconds = call([*cmd, "--resume", "auto", "--cfg-options", *options], folder / "train.log")
    return target, seconds


def evaluate(checkpoint: Path, folder: Path, data: Path, seed: int, layer: int) -> dict:
    """k-NN (last block only) and the three dense protocols at ``layer``; reused when stored."""
    out = {}
    if layer == -1:
        path = folder / "knn.json"
        if read_json(path) is None:
            call(knn_command(checkpoint, data, path), folder / "knn.log")
        out["knn_top1"] = read_json(path)["results"]["20"]["top1"]
    for protocol in DENSE_OPTIONS:
        path = folder / f"{protocol}_layer{layer}.json"
        if read_json(path) is None:
            work_dir = folder / f"{protocol}_layer{layer}"
            command = dense_command(protocol, checkpoint, data, path, work_dir, seed, layer)
            call(command, folder / f"{protocol}_layer{layer}.log")
        out.update(headline(protocol, read_json(path)["results"]))
    return out


def headline(protocol: str, results: dict) -> dict[str, float]:
    if protocol == "hbird":
        return {"hbird_miou": results["mIoU"]}
    if protocol == "cluster":
        return {f"cluster_miou_k{k}": r["mIoU_mean"] for k, r in results.items()}
    feats = results["features"]
    return {
        "corr_pck@0.1": feats["all"]["pck@0.1"],
        "corr_pck@0.1_object": feats["object"]["pck@0.1"],
        "corr_pck@0.1_background": feats["background"]["pck@0.1"],
        "corr_pck@0.1_position_only": results["position-only"]["all"]["pck@0.1"],
    }


def run(args: argparse.Namespace) -> dict:
    """{"figures": {appearance: {layer: {model: {seed: figures}}}}, "train_s": ..., "commit"},
    stored after every evaluation."""
    store = args.work_dir / "dense_compare.json"
    results = read_json(store) or {}
    results["commit"] = git_commit()
    for seed in args.seeds:
        for appearance in args.appearances:
            data = make_data(args.work_dir, appearance, args.num_images)
            trained: Path | None = None
            for model in (*MODELS[1:], MODELS[0]):  # random init copies a trained architecture
                folder = args.work_dir / appearance / model / f"seed{seed}"
                print(f"seed {seed} {appearance} {model} ...", flush=True)
                checkpoint, seconds = checkpoint_for(
                    model, seed, folder, data, args.epochs, trained
                )
                trained = trained or checkpoint
                times = results.setdefault("train_s", {}).setdefault(appearance, {})
                if seconds:
                    times.setdefault(model, {})[str(seed)] = round(seconds, 1)
                for layer in args.layers:
                    figures = evaluate(checkpoint, folder, data, seed, layer)
                    by_layer = results.setdefault("figures", {}).setdefault(appearance, {})
                    by_model = by_layer.setdefault(str(layer), {})
                    by_model.setdefault(model, {})[str(seed)] = figures
                    print(f"  layer {layer}: {figures}", flush=True)
                write_json(store, results)
    return results


METRICS = (
    "knn_top1",
    "hbird_miou",
    "cluster_miou_k11",
    "cluster_miou_k100",
    "corr_pck@0.1",
    "corr_pck@0.1_object",
    "corr_pck@0.1_background",
)


def tables(results: dict) -> str:
    """Markdown: one table per (appearance, block)."""
    parts = []
    for appearance, by_layer in results.get("figures", {}).items():
        for layer, by_model in by_layer.items():
            parts.append(f"### appearance `{appearance}`, block {layer}\n\n" + table(by_model))
    return "\n\n".join(parts)


def table(by_model: dict[str, dict[str, dict]]) -> str:
    """Mean ± std over seeds per model, then the differences paired by training seed."""
    runs = [f for seeds in by_model.values() for f in seeds.values()]
    metrics = [m for m in METRICS if any(m in f for f in runs)]
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for model in MODELS:
        seeds = by_model.get(model, {})
        cells = [format_mean_std([f[m] for f in seeds.values() if m in f]) for m in metrics]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    for a, b in CONTRASTS:
        sa, sb = by_model.get(a, {}), by_model.get(b, {})
        common = sorted(sa.keys() & sb.keys())
        cells = [format_mean_std([sa[s][m] - sb[s][m] for s in common]) for m in metrics]
        lines.append(f"| {a} - {b} (paired) | " + " | ".join(cells) + " |")
    position = sorted({f["corr_pck@0.1_position_only"] for f in runs})
    lines.append("\nposition-only matcher PCK@0.1: " + ", ".join(f"{p:.2f}" for p in position))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = read_json(args.work_dir / "dense_compare.json") if args.report_only else run(args)
    table = tables(results or {})
    (args.work_dir / "dense_compare.md").write_text(table + "\n")
    print(table)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

"""The main job on the built-in data (`make demo`) as a library: data -> pretraining -> k-NN, VOC
probe and the dense protocols (hbird, cluster, corr) -> results -> figures.

Every stage is the user-facing command it stands for (`densedino-data`, `densedino-train`,
`densedino-eval`), run as a subprocess so its logs and progress show as they would by hand.
Re-running continues where it stopped: finished stages are reused. The figures
(`densedino.plots`) are drawn again every time. The command line is
:mod:`densedino.cli.pipeline`; :func:`random_init_like` and :func:`make_data` are also used by
the tests and ``benchmarks/replicate.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "dino": "configs/demo/dino_vit-t_demo.py",
    "densedino": "configs/demo/densedino_vit-t_demo.py",
}
KNN_K = (10, 20)
KNN_CROP = 128
EVAL = (sys.executable, "-m", "densedino.evaluation.cli")
SEG_CONFIG = "configs/seg/leopart_linear_demo.py"  # the seg probe's `demo` protocol
# The dense protocols at their `demo` presets; overclustering at K = the 11 classes and 100,
# one k-means restart per seed (300 and 500, and 5 restarts, would add minutes per model on 2
# cores: 5 seeds x 5 restarts at K 11 + 100 took 3.5 CPU-min on 100 val images). corr's
# random-init row is the pipeline's own random-init model. hbird's memory comes from the first
# 800 trainaug images (64 patches each; val stays whole): a ViT-T/8 forward at 128 px costs
# about 0.17 CPU-s per image here, so the 1,600 would add about 2 min per model.
DENSE_OPTIONS = {
    "hbird": ["--max-images", "800"],
    "cluster": ["--ks", "11", "100", "--restarts", "1"],
    "corr": ["--no-random-baseline"],
}


def stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"({time.perf_counter() - start:.1f} s)", flush=True)


def make_data(args: argparse.Namespace) -> Path:
    from densedino.data import save_preview, write_demo_dataset
    from densedino.data.demo_dataset import GENERATOR_VERSION

    root = args.work_dir / "data"
    meta = root / "meta.json"
    wanted = {
        "num_images": args.num_images,
        "seed": args.seed,
        "appearance": "class",
        "generator_version": GENERATOR_VERSION,
    }
    if meta.is_file() and all(json.loads(meta.read_text()).get(k) == v for k, v in wanted.items()):
        print(f"reusing {root}")
    else:
        write_demo_dataset(root, args.num_images, args.seed, overwrite=True, show_progress=True)
    preview = save_preview(root, args.work_dir / "data_preview.png")
    print(f"data: {root} (preview: {preview})")
    return root


def pretrain(args: argparse.Namespace, name: str, data: Path) -> Path:
    work = args.work_dir / name
    options = [f"train_dataloader.dataset.root={data / 'imagenet' / 'train'}"]
    options.append(f"randomness.seed={args.seed}")
    if args.epochs:
        options.append(f"train_cfg.max_epochs={args.epochs}")
    train = [sys.executable, "-m", "densedino.cli.train", METHODS[name], "--work-dir", str(work)]
    run([*train, "--resume", "auto", "--cfg-options", *options])
    return work / "export" / "backbone.safetensors"


def random_init_like(checkpoint: Path, out: Path, seed: int) -> Path:
    """The same architecture with random weights: the baseline every method must beat."""
    import torch

    from densedino import build_backbone, load_backbone, save_backbone

    trained = load_backbone(checkpoint)
    torch.manual_seed(seed)
    model = build_backbone(
        "vit_tiny", trained.patch_size, depth=trained.depth, img_size=trained.img_size
    )
    return save_backbone(model, out, {"method": "random-init"})


def knn_command(checkpoint: Path, data: Path, out: Path) -> list[str]:
    """`densedino-eval knn` as the main job runs it on the built-in data at `data`."""
    return [*EVAL, "knn", "--checkpoint", str(checkpoint), "--data", str(data / "imagenet"),
            "--crop", str(KNN_CROP), "--k", *map(str, KNN_K), "--out", str(out),
            "--quiet"]  # fmt: skip


def seg_command(
    checkpoint: Path, data: Path, out: Path, work_dir: Path, seed: int, epochs: int
) -> list[str]:
    """`densedino-eval seg`, the `demo` protocol, as the main job runs it."""
    return [*EVAL, "seg", "--checkpoint", str(checkpoint), "--data",
            str(data / "VOCdevkit" / "VOC2012"), "--protocol", "demo", "--seed", str(seed),
            "--epochs", str(epochs), "--work-dir", str(work_dir), "--out", str(out)]  # fmt: skip


def dense_command(
    protocol: str,
    checkpoint: Path,
    data: Path,
    out: Path,
    work_dir: Path,
    seed: int,
    layer: int | None = None,
) -> list[str]:
    """`densedino-eval hbird|cluster|corr` at the `demo` preset with the main job's options
    (:data:`DENSE_OPTIONS`); `layer`: another block's features than the last."""
    layer_option = [] if layer is None else ["--layer", str(layer)]
    return [*EVAL, protocol, "--checkpoint", str(checkpoint), "--data",
            str(data / "VOCdevkit" / "VOC2012"), "--preset", "demo", "--seed", str(seed),
            *layer_option, "--work-dir", str(work_dir), "--out", str(out), "--quiet",
            *DENSE_OPTIONS[protocol]]  # fmt: skip


def knn(args: argparse.Namespace, name: str, checkpoint: Path, data: Path) -> dict:
    out = args.work_dir / "eval" / f"knn_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    run(knn_command(checkpoint, data, out))
    return json.loads(out.read_text())["results"]


def default_seg_epochs() -> int:
    """The `demo` probe protocol's length."""
    from mmengine.config import Config

    return int(Config.fromfile(REPO / SEG_CONFIG).train_cfg.max_epochs)


def seg_epochs(args: argparse.Namespace) -> int:
    """The probe's length: --seg-epochs, else the `demo` protocol's."""
    return args.seg_epochs or default_seg_epochs()


def seg(args: argparse.Namespace, name: str, checkpoint: Path, data: Path) -> dict:
    """The VOC-layout linear probe (`demo` protocol); reused while newer than the checkpoint
    and of the same length."""
    out = args.work_dir / "eval" / f"seg_{name}.json"
    epochs = seg_epochs(args)
    fresh = out.is_file() and out.stat().st_mtime > checkpoint.stat().st_mtime
    if not (fresh and json.loads(out.read_text())["schedule"].get("epochs") == epochs):
        work_dir = args.work_dir / "eval" / f"seg_{name}"
        run(seg_command(checkpoint, data, out, work_dir, args.seed, epochs))
    return json.loads(out.read_text())


def dense(args: argparse.Namespace, name: str, checkpoint: Path, data: Path) -> dict:
    """hbird, cluster and corr at their `demo` presets; each reused while newer than the
    checkpoint. Returns {protocol: results JSON}."""
    results = {}
    for protocol in DENSE_OPTIONS:
        out = args.work_dir / "eval" / f"{protocol}_{name}.json"
        if not (out.is_file() and out.stat().st_mtime > checkpoint.stat().st_mtime):
            work_dir = args.work_dir / "eval" / f"{protocol}_{name}"
            run(dense_command(protocol, checkpoint, data, out, work_dir, args.seed))
        results[protocol] = json.loads(out.read_text())
    return results


def dense_summary(dense_results: dict) -> dict:
    """{model: the headline figures of each dense protocol} (no timings: reproducible)."""
    summary = {}
    for name, result in dense_results.items():
        corr = result["corr"]["results"]
        summary[name] = {
            "hbird_miou": result["hbird"]["results"]["mIoU"],
            "cluster_miou": {k: r["mIoU_mean"] for k, r in result["cluster"]["results"].items()},
            "corr_pck@0.1": {s: v.get("pck@0.1") for s, v in corr["features"].items()},
            "corr_pck@0.1_position_only": corr["position-only"]["all"]["pck@0.1"],
        }
    return summary


def dense_table(summary: dict) -> str:
    """Markdown: one row per model, then the position-only matcher's correspondence."""
    ks = list(next(iter(summary.values()))["cluster_miou"])
    header = (
        "| model | hbird mIoU | "
        + " | ".join(f"cluster mIoU (K={k})" for k in ks)
        + " | corr PCK@0.1 | object | background |"
    )
    lines = [header, "|---" * (len(ks) + 5) + "|"]
    for name, row in summary.items():
        pck = row["corr_pck@0.1"]
        cells = [f"{row['hbird_miou']:.2f}", *(f"{row['cluster_miou'][k]:.2f}" for k in ks)]
        cells += [
            "-" if pck.get(s) is None else f"{pck[s]:.2f}" for s in ("all", "object", "background")
        ]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    position = next(iter(summary.values()))["corr_pck@0.1_position_only"]
    lines.append(
        f"\nPosition-only matcher (same cell of view B, no pixel read): PCK@0.1 {position:.2f}"
    )
    return "\n".join(lines)


def results_table(knn_results: dict, seg_results: dict) -> str:
    """The Markdown table: one row per model, k-NN top-1 for every k and the VOC mIoU."""
    header = "| model | " + " | ".join(f"k-NN top-1 (k={k})" for k in KNN_K) + " | VOC mIoU |"
    lines = [header, "|---" * (len(KNN_K) + 2) + "|"]
    for name, results in knn_results.items():
        cells = [f"{results[str(k)]['top1']:.2f}" for k in KNN_K]
        cells.append(f"{seg_results[name]['mIoU']:.2f}")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def write_results(
    args: argparse.Namespace,
    knn_results: dict,
    seg_results: dict,
    dense_results: dict,
    figures: Sequence[Path] = (),
) -> Path:
    """results.json and results.md (the table, links to the figures, the dense protocols)."""
    summary = {"knn": knn_results, "seg_miou": {k: v["mIoU"] for k, v in seg_results.items()}}
    summary["dense"] = dense_summary(dense_results)
    (args.work_dir / "results.json").write_text(json.dumps(summary, indent=2))
    text = results_table(knn_results, seg_results) + "\n"
    if figures:
        links = [
            f"- [{path.name}]({path.relative_to(args.work_dir).as_posix()})" for path in figures
        ]
        text += "\nFigures:\n\n" + "\n".join(links) + "\n"
    text += "\nDense protocols (`densedino-eval hbird|cluster|corr --preset demo`):\n\n"
    text += dense_table(summary["dense"]) + "\n"
    (args.work_dir / "results.md").write_text(text)
    return args.work_dir / "results.md"


def run_job(args: argparse.Namespace) -> None:
    """Every stage in order; `args` as parsed by :mod:`densedino.cli.pipeline`."""
    args.work_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    stage("1/5 built-in data")
    data = make_data(args)
    checkpoints = {}
    for name in METHODS:
        stage(f"2/5 pretraining {name}")
        checkpoints[name] = pretrain(args, name, data)
    baseline = args.work_dir / "random_init" / "backbone.safetensors"
    baseline = random_init_like(checkpoints["densedino"], baseline, args.seed)
    checkpoints = {"random-init": baseline, **checkpoints}
    stage("3/5 evaluation: k-NN and VOC linear probe")
    knn_results = {name: knn(args, name, ckpt, data) for name, ckpt in checkpoints.items()}
    seg_results = {name: seg(args, name, ckpt, data) for name, ckpt in checkpoints.items()}
    stage("3/5 evaluation: dense protocols (hbird, cluster, corr)")
    dense_start = time.time()
    dense_results = {name: dense(args, name, ckpt, data) for name, ckpt in checkpoints.items()}
    print(f"(dense protocols: {time.time() - dense_start:.1f} s)")
    stage("4/5 results")
    table = write_results(args, knn_results, seg_results, dense_results)
    print(results_table(knn_results, seg_results))
    print(dense_table(dense_summary(dense_results)))
    stage("5/5 figures")
    from densedino.plots import make_figures

    figures = make_figures(args.work_dir, list(METHODS), checkpoints, num_images=args.figure_images)
    dense_figures = [
        Path(result[protocol]["figure"])
        for result in dense_results.values()
        for protocol in DENSE_OPTIONS
        if result[protocol].get("figure")
    ]
    write_results(args, knn_results, seg_results, dense_results, [*figures, *dense_figures])
    print(f"\nresults: {table} and {table.with_suffix('.json')}; total {time.time() - start:.0f} s")
    print("figures:", *(f"  {path}" for path in figures), sep="\n")
    best = checkpoints["densedino"]
    print(f"\nserve the DenseDINO backbone:  .venv/bin/densedino-serve --checkpoint {best}")
    print(f"explore its attention maps:    .venv/bin/densedino-demo --checkpoint {best}")

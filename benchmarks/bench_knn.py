"""k-NN search: FAISS (densedino.evaluation) vs DINO's chunked torch brute force, on CPU.

Methods: ``faiss`` = densedino's exact search on the bank where it lies (``faiss.knn``, no
copy); ``flatip`` = the bank copied into a FAISS ``IndexFlatIP`` (the previous approach);
``ivf`` = an IVF index; ``torch`` = DINO's loop.

Random clustered, L2-normalised features (a bank of N x D with C classes, Q queries) are
written once to a temporary folder; each method then runs in its own subprocess so that its
peak resident memory (``resource.getrusage(...).ru_maxrss``) is its own. Prints wall time,
peak RSS, RSS above the loaded features, and top-1/top-5 for every k.

    python benchmarks/bench_knn.py                                   # 200k x 384, 10k queries
    python benchmarks/bench_knn.py --bank 50000 --queries 5000       # smaller
    python benchmarks/bench_knn.py --methods faiss ivf --nprobe 16   # with an IVF index
    python benchmarks/bench_knn.py --bank 1000000 --queries 2000 --methods faiss  # 1M bank

DINO (eval_knn.py) runs its loop once per k; FAISS searches once at max(k).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("faiss", "flatip", "torch", "ivf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bank", type=int, default=200_000, help="training features N")
    parser.add_argument("--queries", type=int, default=10_000, help="query features Q")
    parser.add_argument("--dim", type=int, default=384, help="feature dimension D")
    parser.add_argument("--classes", type=int, default=1000, help="number of classes C")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument(
        "--noise",
        type=float,
        default=3.0,
        help="per-sample noise / class-centre spread (sets the accuracy)",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["faiss", "torch"])
    parser.add_argument("--nlist", type=int, default=None, help="ivf: lists (default ~4 sqrt N)")
    parser.add_argument("--nprobe", type=int, default=None, help="ivf: lists probed")
    parser.add_argument("--chunk-size", type=int, default=4096, help="faiss: queries per chunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_features(args: argparse.Namespace, folder: Path) -> None:
    """Clustered unit features: class centre + noise, written chunk by chunk."""
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    for name, count in (("train", args.bank), ("query", args.queries)):
        labels = rng.integers(0, args.classes, count)
        out = np.lib.format.open_memmap(
            folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=(count, args.dim)
        )
        for start in range(0, count, 65536):
            part = labels[start : start + 65536]
            x = centres[part] + args.noise * rng.standard_normal(
                (len(part), args.dim), dtype=np.float32
            )
            out[start : start + len(part)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        out.flush()
        np.save(folder / f"{name}_labels.npy", labels)


# ------------------------------------------------------------------------------- workers
def run_faiss(args: argparse.Namespace, data: dict[str, np.ndarray], kind: str) -> dict:
    import faiss

    from densedino.evaluation.knn import IndexSpec, build_index, index_recall, knn_evaluate

    ivf = kind == "ivf"
    spec = IndexSpec("ivf", args.nlist, args.nprobe, gpu=False) if ivf else IndexSpec(gpu=False)
    start = time.perf_counter()
    if kind == "flatip":  # the bank copied into an index, as before
        index = faiss.IndexFlatIP(args.dim)
        index.add(data["train"])
    else:
        index = build_index(data["train"], spec)
    built = time.perf_counter()
    acc = knn_evaluate(
        None,
        data["train_labels"],
        data["query"],
        data["query_labels"],
        args.k,
        args.temperature,
        args.classes,
        chunk_size=args.chunk_size,
        index=index,
    )
    result = {
        "index_s": built - start,
        "seconds": time.perf_counter() - start,
        "acc": {k: (a.top1, a.top5) for k, a in acc.items()},
    }
    if ivf:
        result["recall"] = index_recall(
            index, data["train"], data["query"], args.k, max_queries=1000
        )
    return result


def run_torch(args: argparse.Namespace, data: dict[str, np.ndarray]) -> dict:
    """DINO's eval_knn.knn_classifier (tests/dino_knn.py), once per k (as DINO does), on CPU
    tensors, in DINO's 100 chunks of queries."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from dino_knn import dino_knn_classifier

    train = torch.from_numpy(data["train"])
    train_labels = torch.from_numpy(data["train_labels"])
    test_features = torch.from_numpy(data["query"])
    test_labels = torch.from_numpy(data["query_labels"])
    acc = {}
    start = time.perf_counter()
    for k in args.k:
        _, top1, top5, _ = dino_knn_classifier(
            train,
            train_labels,
            test_features,
            test_labels,
            k,
            args.temperature,
            args.classes,
            keep_scores=False,
        )
        acc[k] = (top1, top5)
    return {"seconds": time.perf_counter() - start, "acc": acc}


def worker(args: argparse.Namespace) -> None:
    # Libraries first, so that "above data" is the method's working memory, not imports.
    import faiss  # noqa: F401
    import torch  # noqa: F401

    import densedino.evaluation.knn  # noqa: F401

    folder = args.workdir
    data = {
        name: np.load(folder / f"{name}.npy")
        for name in ("train", "train_labels", "query", "query_labels")
    }
    baseline = peak_rss_mb()
    result = run_torch(args, data) if args.worker == "torch" else run_faiss(args, data, args.worker)
    result.update(peak_rss_mb=peak_rss_mb(), loaded_rss_mb=baseline)
    print(json.dumps(result))


# -------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    args.k = sorted(set(args.k))
    with tempfile.TemporaryDirectory(prefix="bench_knn_") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        write_features(args, folder)
        bank_mb = args.bank * args.dim * 4 / 2**20
        print(
            f"bank {args.bank} x {args.dim} ({bank_mb:.0f} MiB float32), {args.queries} "
            f"queries, {args.classes} classes, k={args.k}, T={args.temperature} "
            f"(data written in {time.perf_counter() - start:.1f} s)"
        )
        results = {}
        for method in args.methods:
            cmd = [
                sys.executable,
                __file__,
                *(argv or sys.argv[1:]),
                "--worker",
                method,
                "--workdir",
                str(folder),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"{method} failed:\n{out.stderr}")
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"{'method':<8} {'time s':>8} {'peak RSS MiB':>13} {'above data MiB':>15}  "
        + "  ".join(f"top1/top5@{k}" for k in args.k)
    )
    for method, r in results.items():
        accs = "  ".join(f"{r['acc'][str(k)][0]:6.2f}/{r['acc'][str(k)][1]:6.2f}" for k in args.k)
        print(
            f"{method:<8} {r['seconds']:8.1f} {r['peak_rss_mb']:13.0f} "
            f"{r['peak_rss_mb'] - r['loaded_rss_mb']:15.0f}  {accs}"
        )
        if "recall" in r:
            print(
                f"{'':<8} ivf recall vs exact: "
                + ", ".join(f"@{k} {v:.3f}" for k, v in r["recall"].items())
            )
    if {"faiss", "torch"} <= results.keys():
        base, new = results["torch"], results["faiss"]
        print(
            f"faiss / torch: time {new['seconds'] / base['seconds']:.3f}, memory above data "
            f"{new['peak_rss_mb'] - new['loaded_rss_mb']:.0f} vs "
            f"{base['peak_rss_mb'] - base['loaded_rss_mb']:.0f} MiB"
        )
        same = all(
            results["faiss"]["acc"][str(k)][0] == results["torch"]["acc"][str(k)][0] for k in args.k
        )
        print(
            f"top-1 identical for every k: {same} (top-5 may differ where DINO credits "
            "classes with no vote, see densedino.evaluation.knn.count_hits)"
        )


if __name__ == "__main__":
    main()

"""Eval forward time of our ViT vs timm's, and the cost of reference tokens (prints figures).

Usage: python benchmarks/bench_backbone.py [--arch vit_small] [--batch 32] [--size 224]
       [--runs 5] [--refs 8 16] [--device cpu]

Target: ours / timm <= 1.05 without reference tokens. Runs of the compared models are
interleaved so that background load hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch

from densedino.models.vit import build_backbone

TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], runs: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function, after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(runs):
            for name, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small", choices=sorted(TIMM_NAMES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--refs", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    reference = (
        timm.create_model(
            TIMM_NAMES[args.arch], pretrained=False, num_classes=0, dynamic_img_size=True
        )
        .to(device)
        .eval()
    )
    ours = build_backbone(args.arch).to(device).eval()
    ours.load_state_dict(reference.state_dict())
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    points = {m: torch.rand(args.batch, m, 2, device=device) * 2 - 1 for m in args.refs}

    fns: dict[str, Callable[[], object]] = {
        "timm": lambda: reference.forward_features(images),
        "ours": lambda: ours.forward_features(images),
    }
    for m, pts in points.items():
        fns[f"ours+{m}ref"] = lambda pts=pts: ours.forward_features(images, pts)
    medians = time_interleaved(fns, args.runs, device)

    print(
        f"{args.arch} eval forward, batch {args.batch}, {args.size} px, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.runs}"
    )
    base = medians["timm"]
    for name, seconds in medians.items():
        rate = args.batch / seconds
        ratio = seconds / base
        print(f"  {name:<12} {seconds * 1000:9.1f} ms  {rate:8.1f} img/s  x{ratio:.3f} timm")
    for m in args.refs:
        extra = medians[f"ours+{m}ref"] / medians["ours"] - 1
        print(f"  cost of {m} reference tokens: {extra * 100:+.1f}% over ours without")
    ratio = medians["ours"] / base
    print(f"ours / timm = {ratio:.3f} (target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")


if __name__ == "__main__":
    main()

"""One DenseDINO training step vs one DINO step on the same views (issue 4 target: <= 1.10).

    .venv/bin/python benchmarks/bench_train_step.py [--arch vit_small --size 224 --batch 16]

Forward, backward and optimizer step of the student plus the teacher forward and EMA, for the
paper's views (4 x 224 px, 2 teacher views, 4 points per pair). Steps alternate between the two
methods so that a change in machine load hits both; the median of each is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from densedino.data.views import MultiViewTransform, ViewConfig, collate_views
from densedino.methods.base import StepState
from densedino.methods.densedino import DenseDINO
from densedino.methods.dino import DINO


def make_batch(size: int, batch: int, points: int) -> dict:
    cfg = ViewConfig(num_global=4, global_size=size, num_points=points)
    transform = MultiViewTransform(cfg)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size + 32, size + 64), dtype=torch.uint8)
    return collate_views([transform(img, generator=generator) for img in images])


def step_seconds(method, optimizer, batch: dict) -> float:
    start = time.perf_counter()
    loss = method.compute_losses(batch, StepState())["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.update_teacher(0.996)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    batch = make_batch(args.size, args.batch, args.points)
    common = dict(arch=args.arch, out_dim=args.out_dim, backbone=dict(img_size=args.size))
    methods = {"DINO": DINO(**common), "DenseDINO": DenseDINO(**common)}
    optimizers = {k: torch.optim.AdamW(m.student.parameters(), 1e-4) for k, m in methods.items()}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for i in range(args.steps + 1):
        for name, method in methods.items():
            seconds = step_seconds(method, optimizers[name], batch)
            if i > 0:  # the first step of each warms up allocators
                times[name].append(seconds)
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.arch}, {args.batch} images x 4 views of {args.size} px, "
          f"{args.points} points per pair, out_dim {args.out_dim}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")  # fmt: skip
    for name, seconds in medians.items():
        print(f"  {name:10s} {seconds:8.3f} s/step")
    print(
        f"  ratio DenseDINO / DINO = {medians['DenseDINO'] / medians['DINO']:.3f} (target <= 1.10)"
    )


if __name__ == "__main__":
    main()

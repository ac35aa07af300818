"""Throughput of the built-in dataset writer (prints figures; not a test).

    python benchmarks/bench_synthetic.py [--num-images 3000] [--workers W] [--image-size 128]

Prints the single-process cost of rendering and of encoding one scene, then the end-to-end
rate of `write_demo_dataset` (render + encode + write both layouts) with the given workers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from densedino.data.demo_dataset import encode_scene, label_of_index, write_demo_dataset
from densedino.data.synthetic import render_scene, scene_rng


def time_per_scene(image_size: int, count: int = 200) -> tuple[float, float]:
    """Milliseconds per scene to render, and to encode (JPEG + two PNGs), in this process."""
    render_s = encode_s = 0.0
    for index in range(count):
        start = time.perf_counter()
        image, mask, _ = render_scene(scene_rng(0, index), image_size, label_of_index(index))
        middle = time.perf_counter()
        encode_scene(image, mask)
        render_s += middle - start
        encode_s += time.perf_counter() - middle
    return 1000 * render_s / count, 1000 * encode_s / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()

    render_ms, encode_ms = time_per_scene(args.image_size)
    print(f"one process: render {render_ms:.2f} ms/scene, encode {encode_ms:.2f} ms/scene")

    workers = args.workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        cpu_start = os.times()
        info = write_demo_dataset(
            Path(tmp) / "data",
            num_images=args.num_images,
            image_size=args.image_size,
            workers=workers,
        )
        cpu = os.times()
    # Children's CPU time tells how much of the wall time the machine actually gave us.
    cpu_s = sum(cpu[i] - cpu_start[i] for i in range(4))
    print(
        f"write_demo_dataset: {info.num_images} images of {args.image_size} px, "
        f"{workers} workers: {info.seconds:.1f} s wall, {cpu_s:.1f} s CPU, "
        f"{info.num_images / info.seconds:.0f} images/s "
        f"({info.num_images / cpu_s:.0f} images per CPU-second)"
    )


if __name__ == "__main__":
    main()

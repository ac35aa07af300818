"""`python -m densedino.cli.pipeline`: the main job on the built-in data (`make demo`).

The stages live in :mod:`densedino.demo_job`; this module only parses the command line.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from densedino.demo_job import run_job


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m densedino.cli.pipeline",
        description="Run the main job on the built-in data: generate the dataset, pretrain DINO "
        "and DenseDINO with the same budget, evaluate both (and a random-init baseline) with "
        "k-NN, the VOC linear probe and the dense protocols (hbird, cluster, corr), and write "
        "results tables and figures. Finished stages "
        "are reused when run again.",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("work_dirs/demo"))
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="override the demo configs' epochs")
    parser.add_argument(
        "--seg-epochs",
        type=int,
        help="override the VOC probe's epochs (default: the demo protocol's)",
    )
    parser.add_argument(
        "--figure-images",
        type=int,
        default=4,
        help="val images in figures/attention_maps.png",
    )
    args = parser.parse_args(argv)
    for name in ("num_images", "epochs", "seg_epochs", "figure_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_job(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`densedino-eval knn|seg|hbird|cluster|corr`: evaluation of a frozen backbone."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from densedino.evaluation.dense.cli import add_dense_subcommands
from densedino.evaluation.knn_cli import add_knn_subcommand
from densedino.evaluation.seg.cli import add_seg_subcommand


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densedino-eval",
        description="Evaluate a frozen backbone (any checkpoint densedino.load_backbone reads): "
        "`knn` = DINO's weighted k-NN on an ImageNet-style folder with FAISS; `seg` = the "
        "Pascal VOC linear probe (Leopart protocol, or DINOv2's linear-bn) on mmsegmentation; "
        "`hbird` = Hummingbird retrieval segmentation; `cluster` = Leopart's overclustering; "
        "`corr` = cross-view patch correspondence with known geometry.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{knn,seg,hbird,cluster,corr}"
    )
    add_knn_subcommand(sub)
    add_seg_subcommand(sub)
    add_dense_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

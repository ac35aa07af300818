"""`densedino-eval knn|seg`: evaluation of a frozen backbone."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from densedino.evaluation.knn_cli import add_knn_subcommand


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densedino-eval",
        description="Evaluate a frozen backbone (any checkpoint densedino.load_backbone reads): "
        "`knn` = DINO's weighted k-NN on an ImageNet-style folder with FAISS; `seg` = the "
        "Pascal VOC linear probe on mmsegmentation (not built yet).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{knn,seg}")
    add_knn_subcommand(sub)
    seg = sub.add_parser("seg", help="Pascal VOC linear probe (not built yet)")
    seg.set_defaults(func=_seg_not_built)
    return parser


def _seg_not_built(args: argparse.Namespace) -> int:
    print("densedino-eval seg: not built yet (issue 7: mmsegmentation linear probe)")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""`densedino-data`: write the built-in procedural dataset (ImageNet and Pascal VOC layouts)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from densedino.data.demo_dataset import DemoDatasetInfo, save_preview, write_demo_dataset
from densedino.data.synthetic import APPEARANCES


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of `densedino-data`."""
    parser = argparse.ArgumentParser(
        prog="densedino-data",
        description=(
            "Render the built-in multi-object dataset (shapes = classes, random colours and "
            "textures) and write it under ROOT in two layouts that share the same scenes: "
            "ROOT/imagenet/{train,val}/<class>/*.jpg (folder = label of the largest object) and "
            "ROOT/VOCdevkit/VOC2012 (JPEGImages, SegmentationClass with 255 borders, "
            "SegmentationClassAug, ImageSets/Segmentation/{train,trainaug,val}.txt). "
            "The output is fully determined by the seed, whatever the number of workers."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", metavar="ROOT", help="output directory (must be empty or absent)")
    parser.add_argument("--num-images", type=int, default=2000, help="images in total")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of images in the val split"
    )
    parser.add_argument(
        "--appearance",
        choices=APPEARANCES,
        default="class",
        help="class: objects usually wear their class's colour and texture (the demo's data); "
        "random: colour and texture are independent of the class, shape is the only cue",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: all CPUs)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace ROOT if it exists and is not empty"
    )
    parser.add_argument(
        "--preview",
        metavar="PNG",
        default=None,
        help="also save a grid of val images and their masks to this PNG file",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def format_summary(info: DemoDatasetInfo) -> str:
    """Human-readable summary: counts per split, per-class histogram, time."""
    width = max(len(name) for name in info.classes)
    lines = [
        f"wrote {info.num_images} images ({info.image_size}x{info.image_size}, seed {info.seed}) "
        f"to {info.root} in {info.seconds:.1f} s "
        f"({info.num_images / max(info.seconds, 1e-9):.0f} images/s)",
        f"  imagenet: train {info.num_train}, val {info.num_val}   ({info.imagenet_train.parent})",
        f"  voc:      train {info.num_voc_train}, trainaug {info.num_voc_trainaug}, "
        f"val {info.num_voc_val}   ({info.voc_root})",
        f"  {'class':<{width}}  {'train':>6}  {'val':>6}",
    ]
    for name in info.classes:
        train, val = info.train_class_counts[name], info.val_class_counts[name]
        lines.append(f"  {name:<{width}}  {train:>6}  {val:>6}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        info = write_demo_dataset(
            args.root,
            num_images=args.num_images,
            seed=args.seed,
            image_size=args.image_size,
            val_fraction=args.val_fraction,
            appearance=args.appearance,
            workers=args.workers,
            overwrite=args.overwrite,
            show_progress=not args.quiet,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))  # exits with status 2 and the usage line
    print(format_summary(info))
    if args.preview:
        print(f"preview: {save_preview(info, args.preview)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

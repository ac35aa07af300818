"""`densedino-demo`: Gradio app showing a backbone's attention and dense features."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from densedino.cli.model_args import add_model_arguments, resolve_device


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="densedino-demo",
        description=(
            "Gradio app: last-block attention of every head, DINO's mass-threshold masks, a "
            "PCA of the patch features and, for a clicked point, the attention and similarity "
            "map of a reference token placed there. Without --checkpoint it runs a randomly "
            "initialised backbone (labelled as such in the page)."
        ),
    )
    add_model_arguments(
        parser,
        checkpoint_required=False,
        random_weights=True,
        checkpoint_help="backbone weights (backbone.safetensors from training, or any format "
        "densedino.weights.load_backbone reads); default: random weights",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=448,
        help="longer side of the model input in pixels, rounded to the patch size (default 448)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model, build the app and serve it until interrupted."""
    args = build_parser().parse_args(argv)
    # Imported here so that --help stays fast (gradio takes seconds to import).
    from densedino.serve.demo import Explorer, build_demo, bundled_examples, launch, load_model

    try:
        device = resolve_device(args.device)
        model, label = load_model(args.checkpoint, args.arch, args.patch_size, which=args.which)
        explorer = Explorer(model, args.image_size, device)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"densedino-demo: {err}", file=sys.stderr)
        return 2
    demo = build_demo(explorer, label, bundled_examples())
    launch(demo, args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

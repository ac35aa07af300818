"""`densedino-serve`: HTTP API returning dense features and attention maps of a checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from densedino.cli.model_args import add_model_arguments, random_arch, resolve_device

API_KEY_ENV = "DENSEDINO_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densedino-serve",
        description=(
            "FastAPI server (uvicorn) returning CLS/patch features and attention maps of a "
            "backbone: POST /v1/features, POST /v1/attention, GET /v1/model, /healthz, "
            f"/readyz, /metrics. Set {API_KEY_ENV} to require 'Authorization: Bearer <key>' "
            "on every route but /healthz and /readyz. API docs at /docs once running."
        ),
    )
    model = add_model_arguments(parser, checkpoint_required=False, random_weights=True)
    model.add_argument(
        "--random-weights",
        action="store_true",
        help="serve a randomly initialised --arch instead of --checkpoint (for trying the API; "
        "/v1/model says so)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--max-batch", type=int, default=16, help="images per forward pass")
    parser.add_argument(
        "--max-delay-ms",
        type=float,
        default=5.0,
        help="batches never wait to fill (a batch starts as soon as the model is free, with "
        "what has queued); when inputs of several tasks/sizes wait, the fullest group runs "
        "first unless an image has waited this long (0: first come, first served)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=128, help="waiting images before answering 503"
    )
    parser.add_argument("--max-upload-mb", type=float, default=16.0, help="request body limit")
    parser.add_argument(
        "--max-pixels", type=int, default=4096 * 4096, help="pixels per uploaded image"
    )
    parser.add_argument("--max-images", type=int, default=16, help="images per request")
    parser.add_argument("--max-side", type=int, default=1024, help="longest model input side")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (not args.random_weights):
        parser.error("give exactly one of --checkpoint and --random-weights")
    # Imported here so that --help answers without loading torch.
    import torch
    import uvicorn

    from densedino.serve.app import ServeSettings, create_app
    from densedino.serve.codec import Limits
    from densedino.serve.loading import load_model

    if args.threads is not None:
        if args.threads < 1:
            print("densedino-serve: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        model, info = load_model(
            args.checkpoint,
            random_weights=args.random_weights,
            arch=args.arch,
            patch_size=args.patch_size,
            which=args.which,
        )
        limits = Limits(
            max_body_bytes=int(args.max_upload_mb * 2**20),
            max_pixels=args.max_pixels,
            max_images=args.max_images,
            max_side=args.max_side,
        )
        settings = ServeSettings(
            max_batch=args.max_batch,
            max_delay_ms=args.max_delay_ms,
            max_queue=args.max_queue,
            limits=limits,
            api_key=os.environ.get(API_KEY_ENV) or None,
            device=resolve_device(args.device),
            model_info=info,
        )
        app = create_app(model, settings=settings)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"densedino-serve: {exc}", file=sys.stderr)
        return 2
    if info.random_weights:
        logging.getLogger("densedino.serve").warning(
            "serving RANDOM weights (%s): features carry no meaning", random_arch(args)
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The model options shared by every command that loads a backbone: one group, one behaviour.

``--checkpoint PATH``   backbone weights in any format :func:`densedino.weights.load_backbone`
                        reads (required or not, depending on the command).
``--arch NAME``         default: inferred from the checkpoint; ``vit_small`` for random weights.
``--patch-size N``      random weights only; default 16.
``--which``             teacher (default) or student network of a training checkpoint.
``--device DEV``        default: cuda when available (``cuda:$LOCAL_RANK`` under torchrun),
                        else cpu.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from densedino.models.vit import ARCHS, PATCH_SIZES

DEFAULT_RANDOM_ARCH = "vit_small"
DEFAULT_RANDOM_PATCH = 16


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    checkpoint_required: bool = True,
    random_weights: bool = False,
    checkpoint_help: str | None = None,
    device: bool = True,
) -> argparse._ArgumentGroup:
    """Add ``--checkpoint --arch --which --device`` (and ``--patch-size`` when the command can
    build random weights) to `parser`, in a group titled "model"; without `device`, no
    ``--device``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--checkpoint",
        type=Path,
        required=checkpoint_required,
        default=None,
        help=checkpoint_help
        or "backbone weights: export/backbone.safetensors, a training checkpoint, or any format "
        "densedino.weights.load_backbone reads (timm/DINO weights)",
    )
    group.add_argument(
        "--arch",
        default=None,
        choices=sorted(ARCHS),
        help="architecture (default: inferred from the checkpoint, and checked against it when "
        f"given; {DEFAULT_RANDOM_ARCH} for random weights)",
    )
    if random_weights:
        group.add_argument(
            "--patch-size",
            type=int,
            default=DEFAULT_RANDOM_PATCH,
            choices=PATCH_SIZES,
            help=f"patch size of random weights (default {DEFAULT_RANDOM_PATCH}; a checkpoint "
            "brings its own)",
        )
    group.add_argument(
        "--which",
        default="teacher",
        choices=("teacher", "student"),
        help="network of a training checkpoint (default teacher)",
    )
    if device:  # not for commands whose runner places the model (mmengine)
        group.add_argument(
            "--device",
            default=None,
            help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available -- "
            "cuda:$LOCAL_RANK under torchrun -- else cpu)",
        )
    return group


def random_arch(args: argparse.Namespace) -> str:
    """The architecture to build when no checkpoint is given."""
    return args.arch or DEFAULT_RANDOM_ARCH


def resolve_device(device: str | None) -> str:
    """``--device`` as a torch device string: the value given, or cuda/cpu as documented."""
    if device:
        return device
    import torch  # here so that --help answers without loading torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"

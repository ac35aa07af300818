"""The frozen ViT every `densedino-eval` protocol reads: a densedino checkpoint or a timm ViT.

One place for the five subcommands (knn, seg, hbird, cluster, corr):

* :func:`add_backbone_arguments` adds the model options: ``--checkpoint FILE`` (anything
  :func:`densedino.weights.load_backbone` reads: DenseDINO/DINO checkpoints, exported backbones,
  timm state dicts of the plain ViT) or ``--timm NAME --weights FILE``, beside ``--arch --which``
  (and ``--device``, ``--layer`` where the command has them);
* :class:`BackboneSpec` is what was asked for, checked without loading anything; its
  :meth:`~BackboneSpec.model_id` (from the file's sha256) keys the feature caches;
* :meth:`BackboneSpec.load` builds the :class:`Backbone`. A timm ViT is built offline
  (``timm.create_model(NAME, pretrained=False)``: nothing is downloaded), then the file is loaded
  strictly; timm handles patch 14, register tokens and layer scale itself, and the depth is read
  off the weights so that shallower variants load too.

What each protocol reads (all after the final norm):

* k-NN: ``model(images)`` [B, D]. Our ViT returns its CLS token; a timm ViT (built with
  ``num_classes=0``) returns its pre-logits, which for class-token pooling (``global_pool='token'``:
  DINO, DINOv2, DeiT) is token 0 of ``forward_features``, the CLS token: timm lays the sequence
  out as [CLS | registers | patches], so registers never move it. A timm ViT without a class
  token gives its own pooling (average or attention pool) instead.
* seg and the dense protocols: :func:`patch_tokens` [B, H/p, W/p, D], i.e. ``forward_features``
  minus its ``num_prefix_tokens`` (CLS and registers) for timm, ``forward_features()["patch"]``
  for ours.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedino.cli.model_args import add_model_arguments
from densedino.evaluation.features import file_fingerprint

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")

# Pre-wrapped: the dense and seg commands print descriptions as they are (RawDescription).
MODEL_HELP = """--checkpoint FILE: anything densedino.load_backbone reads (DenseDINO/DINO training
checkpoints, exported backbones, timm state dicts of the plain ViT); or any timm ViT:
--timm NAME --weights FILE, built offline (timm.create_model(NAME, pretrained=False), then the
file loaded strictly; patch 14, register tokens and layer scale included), e.g.
--timm vit_small_patch14_reg4_dinov2 --weights dinov2_vits14_reg4.pth"""


# ------------------------------------------------------------------------------- options
def add_backbone_arguments(
    parser: argparse.ArgumentParser, *, device: bool = True, layer: bool = False
) -> argparse._ArgumentGroup:
    """The "model" group of every `densedino-eval` subcommand: ``--checkpoint``, or ``--timm``
    and ``--weights``; ``--arch --which`` (and ``--device``, ``--layer`` when asked for).

    Which of them may go together is checked by :class:`BackboneSpec` (clear messages for each
    case, and the same for commands that build the spec without argparse)."""
    group = add_model_arguments(
        parser,
        checkpoint_required=False,
        device=device,
        checkpoint_help="backbone weights densedino.load_backbone reads (or --timm NAME "
        "--weights FILE)",
    )
    group.description = MODEL_HELP
    group.add_argument(
        "--timm",
        dest="timm_name",
        metavar="NAME",
        default=None,
        help="a timm ViT name instead of --checkpoint, e.g. vit_small_patch14_reg4_dinov2 "
        "(needs --weights; built with pretrained=False)",
    )
    group.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="local weights file of the --timm model (.safetensors or a torch.save'd state "
        "dict; 'model'/'state_dict'/'teacher' wrappers and module./backbone. prefixes are "
        "unwrapped)",
    )
    if layer:
        group.add_argument(
            "--layer",
            type=int,
            default=None,
            help="block index whose patch tokens (after the final norm) are read; negative "
            "counts from the end (default: the last block)",
        )
    return group


# ------------------------------------------------------------------------------ backbone
@dataclass
class Backbone:
    """A frozen ViT in eval mode with what the protocols need to know about it."""

    model: nn.Module
    kind: str  # "densedino" or "timm"
    arch: str  # our architecture name ("custom" if none fits) or the timm name
    patch_size: int
    embed_dim: int
    depth: int
    model_id: str  # identifies the weights in reports and caches
    layer: int | None = None  # block index (0..depth-1) whose patch tokens are read; None = last

    def to(self, device: torch.device | str) -> Backbone:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def patch_features(self, images: Tensor) -> Tensor:
        """L2-normalised float patch tokens [B, h, w, D] (the dense protocols)."""
        tokens = patch_tokens(self.model, self.kind, self.patch_size, images, self.layer)
        return F.normalize(tokens.float(), dim=-1)


def check_image_size(images: Tensor, patch_size: int) -> None:
    """Sides must be multiples of the patch size (timm would only assert it)."""
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the patch size {patch_size}"
        )


def patch_tokens(
    model: nn.Module, kind: str, patch_size: int, images: Tensor, layer: int | None = None
) -> Tensor:
    """Patch tokens [B, H/p, W/p, D] after the final norm (of block `layer`, else the last).

    Not under inference mode: the seg probe trains a head on these (under ``no_grad``), and
    inference tensors cannot be saved for its backward pass.
    """
    check_image_size(images, patch_size)
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    if kind == "densedino":
        if layer is None:
            return model.forward_features(images)["patch"]
        return model.get_intermediate_layers(images, [layer])[0]["patch"]
    if layer is None:
        out = model.forward_features(images)  # [B, prefix + h*w, D]: CLS, registers, patches
        return out[:, model.num_prefix_tokens :].reshape(images.shape[0], *grid, -1)
    (nchw,) = model.forward_intermediates(
        images, indices=[layer], norm=True, output_fmt="NCHW", intermediates_only=True
    )
    return nchw.permute(0, 2, 3, 1)


def _check_layer(layer: int | None, depth: int) -> int | None:
    if layer is not None and not -depth <= layer < depth:
        raise ValueError(f"--layer must be in [-{depth}, {depth}) for a {depth}-block ViT")
    return None if layer is None else layer % depth


# ---------------------------------------------------------------------------------- timm
def _read_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"--weights {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):  # common wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def load_timm_vit(name: str, weights: str | os.PathLike[str]) -> nn.Module:
    """timm ViT `name` built offline (pretrained=False) with the weights of file `weights`."""
    import timm

    state = _read_state(Path(weights))
    blocks = {int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key))}
    kwargs: dict[str, object] = {"num_classes": 0, "dynamic_img_size": True}
    if blocks:
        kwargs["depth"] = max(blocks) + 1
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as error:  # unknown model name
        raise ValueError(f"timm cannot build {name!r}: {error}") from error
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # classifier, if any
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"{weights} does not fit timm's {name}: {str(error)[:500]}") from error
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not fit timm's {name}: missing {sorted(missing)[:6]}, "
            f"unexpected {sorted(unexpected)[:6]}"
        )
    return model.eval().requires_grad_(False)


def _timm_patch_size(model: nn.Module, name: str) -> int:
    patch = model.patch_embed.patch_size
    height, width = patch if isinstance(patch, tuple) else (patch, patch)
    if height != width:
        raise ValueError(f"timm's {name} has {height}x{width} patches; square ones only")
    return int(height)


# ---------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class BackboneSpec:
    """A model as the options name it: ``checkpoint`` (with ``arch``, ``which``), or
    ``timm_name`` with ``weights``. Invalid combinations raise ValueError on construction."""

    checkpoint: Path | None = None
    timm_name: str | None = None
    weights: Path | None = None
    arch: str | None = None
    which: str = "teacher"

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.timm_name is not None:
            raise ValueError("--checkpoint and --timm exclude each other: give one model")
        if self.timm_name is None:
            if self.weights is not None:
                raise ValueError(
                    "--weights goes with --timm NAME (a densedino-readable file is a --checkpoint)"
                )
            if self.checkpoint is None:
                raise ValueError("no model: give --checkpoint FILE, or --timm NAME --weights FILE")
            return
        if self.weights is None:
            raise ValueError("--timm needs --weights FILE (a local file: nothing is downloaded)")
        if self.arch is not None:
            raise ValueError("--arch applies to --checkpoint; a --timm model is its NAME")
        if self.which != "teacher":
            raise ValueError("--which applies to --checkpoint (training checkpoints)")

    @classmethod
    def from_args(cls, args: argparse.Namespace | Any) -> BackboneSpec:
        """The spec of options added by :func:`add_backbone_arguments` (or of any object with
        the same attributes, such as the seg probe's settings)."""
        return cls(
            checkpoint=args.checkpoint,
            timm_name=args.timm_name,
            weights=args.weights,
            arch=args.arch,
            which=args.which,
        )

    @property
    def file(self) -> Path:
        """The weights file: the checkpoint, or the --timm model's --weights."""
        path = self.checkpoint if self.timm_name is None else self.weights
        assert path is not None  # __post_init__ saw to it
        return Path(path)

    @property
    def name(self) -> str:
        """A short name for work directories: the checkpoint's stem or the timm name."""
        return self.timm_name or self.file.stem

    def check_file(self) -> None:
        if self.file.is_file():
            return
        if self.timm_name is None:
            raise FileNotFoundError(f"no checkpoint file at {self.file}")
        raise FileNotFoundError(f"--weights {self.file} does not exist")

    def model_id(self) -> str:
        """Identifies the weights without loading them (caches, reports): the file's sha256,
        plus the timm name (one file may fit several names) or what is read of a checkpoint."""
        self.check_file()
        digest = file_fingerprint(self.file)[:16]
        if self.timm_name is not None:
            return f"timm:{self.timm_name}:{digest}"
        return f"{self.which}:{self.arch or 'auto'}:{digest}"

    def describe(self) -> dict[str, Any]:
        """The options, for results JSON."""
        return {
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "timm": self.timm_name,
            "weights": None if self.weights is None else str(self.weights),
            "which": self.which,
        }

    def load(self, layer: int | None = None) -> Backbone:
        """The frozen :class:`Backbone` (eval mode, no gradients) on the CPU."""
        model_id = self.model_id()
        if self.timm_name is not None:
            model = load_timm_vit(self.timm_name, self.file)
            depth = len(model.blocks)
            return Backbone(
                model,
                "timm",
                self.timm_name,
                _timm_patch_size(model, self.timm_name),
                model.embed_dim,
                depth,
                model_id,
                _check_layer(layer, depth),
            )
        from densedino.models.vit import arch_name
        from densedino.weights import load_backbone

        vit = load_backbone(self.file, arch=self.arch, which=self.which).eval()
        return Backbone(
            vit.requires_grad_(False),
            "densedino",
            arch_name(vit) or "custom",
            vit.patch_size,
            vit.embed_dim,
            vit.depth,
            model_id,
            _check_layer(layer, vit.depth),
        )


def random_like(backbone: Backbone, seed: int = 0) -> Backbone:
    """The same architecture with freshly drawn weights: the baseline every backbone must beat."""
    torch.manual_seed(seed)
    model = backbone.model
    if backbone.kind == "densedino":
        from densedino.models.vit import VisionTransformer

        fresh: nn.Module = VisionTransformer(
            img_size=model.img_size,
            patch_size=model.patch_size,
            embed_dim=model.embed_dim,
            depth=model.depth,
            num_heads=model.num_heads,
            ref_content=model.ref_content,
            ref_padding=model.ref_padding,
        )
    else:
        import timm

        fresh = timm.create_model(
            backbone.arch,
            pretrained=False,
            num_classes=0,
            dynamic_img_size=True,
            depth=backbone.depth,
        )
    return Backbone(
        fresh.eval().requires_grad_(False),
        backbone.kind,
        backbone.arch,
        backbone.patch_size,
        backbone.embed_dim,
        backbone.depth,
        f"random-init:seed{seed}",
        backbone.layer,
    )

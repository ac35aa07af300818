"""Patch features of any ViT for the dense protocols: densedino checkpoints or timm ViTs.

``load_dense_backbone`` returns a :class:`DenseBackbone`, one interface over

* every checkpoint :func:`densedino.weights.load_backbone` reads (DenseDINO, DINO, timm
  state dicts of the plain ViT), and
* any timm ViT by name with a local weights file (``--timm vit_small_patch14_reg4_dinov2
  --weights FILE``): built with ``pretrained=False`` (nothing is downloaded), then the file is
  loaded strictly. timm handles patch 14, register tokens (``num_prefix_tokens``) and layer
  scale itself; the depth is read off the weights so that shallower variants load too.

Features are the patch tokens of the last block (or of ``layer``) after the final norm,
L2-normalised, as [B, h, w, D].
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedino.evaluation.features import file_fingerprint

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class DenseBackbone:
    """A frozen ViT with ``patch_features(images) -> [B, h, w, D]`` (unit-norm rows)."""

    model: nn.Module
    patch_size: int
    embed_dim: int
    depth: int
    kind: str  # "densedino" or "timm"
    layer: int | None = None  # block index (negative from the end); None = the last block
    model_id: str = ""  # identifies the weights (file hash) in reports and caches

    def to(self, device: torch.device | str) -> DenseBackbone:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def patch_features(self, images: Tensor) -> Tensor:
        """Normalised patch tokens [B, h, w, D]; sides must be multiples of the patch size."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        grid = (height // self.patch_size, width // self.patch_size)
        if self.kind == "densedino":
            if self.layer is None:
                tokens = self.model.forward_features(images)["patch"]
            else:
                tokens = self.model.get_intermediate_layers(images, [self.layer])[0]["patch"]
        elif self.layer is None:
            out = self.model.forward_features(images)  # [B, prefix + h*w, D], normed
            tokens = out[:, self.model.num_prefix_tokens :].reshape(images.shape[0], *grid, -1)
        else:
            (nchw,) = self.model.forward_intermediates(
                images, indices=[self.layer], norm=True, output_fmt="NCHW", intermediates_only=True
            )
            tokens = nchw.permute(0, 2, 3, 1)
        return F.normalize(tokens.float(), dim=-1)


def _check_layer(layer: int | None, depth: int) -> int | None:
    if layer is not None and not -depth <= layer < depth:
        raise ValueError(f"--layer must be in [-{depth}, {depth}) for a {depth}-block ViT")
    return None if layer is None else layer % depth


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


def load_dense_backbone(
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    timm_name: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    which: str = "teacher",
    layer: int | None = None,
) -> DenseBackbone:
    """A :class:`DenseBackbone` from a densedino-readable checkpoint, or a timm name + file."""
    if (checkpoint is None) == (timm_name is None):
        raise ValueError("give either --checkpoint or --timm NAME --weights FILE")
    if timm_name is not None:
        if weights is None:
            raise ValueError("--timm needs --weights FILE (nothing is downloaded)")
        model = load_timm_vit(timm_name, weights)
        patch = model.patch_embed.patch_size
        patch_size = patch[0] if isinstance(patch, tuple) else int(patch)
        depth = len(model.blocks)
        digest = hashlib.sha256(timm_name.encode()).hexdigest()[:8]
        return DenseBackbone(
            model,
            patch_size,
            model.embed_dim,
            depth,
            "timm",
            _check_layer(layer, depth),
            f"timm:{timm_name}:{digest}:{file_fingerprint(weights)[:16]}",
        )
    from densedino.weights import load_backbone

    model = load_backbone(checkpoint, which=which).requires_grad_(False)
    return DenseBackbone(
        model,
        model.patch_size,
        model.embed_dim,
        model.depth,
        "densedino",
        _check_layer(layer, model.depth),
        f"{which}:{file_fingerprint(checkpoint)[:16]}",
    )


def random_like(backbone: DenseBackbone, seed: int = 0) -> DenseBackbone:
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

        name = backbone.model_id.split(":")[1]
        fresh = timm.create_model(
            name, pretrained=False, num_classes=0, dynamic_img_size=True, depth=backbone.depth
        )
    return DenseBackbone(
        fresh.eval().requires_grad_(False),
        backbone.patch_size,
        backbone.embed_dim,
        backbone.depth,
        backbone.kind,
        backbone.layer,
        f"random-init:seed{seed}",
    )

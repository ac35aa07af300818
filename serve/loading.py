"""The served model: loaded from a checkpoint (with its sha256 and method) or random weights."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import torch

from densedino.cli.model_args import DEFAULT_RANDOM_ARCH
from densedino.models.vit import VisionTransformer, arch_name, build_backbone
from densedino.weights import load_backbone

METADATA_SIDECAR = "backbone.json"  # written next to backbone.safetensors by the export


@dataclass(frozen=True)
class ModelInfo:
    """Where the served weights come from; reported by `GET /v1/model`."""

    source: str = "in-memory"  # "checkpoint", "random" or "in-memory"
    checkpoint: str | None = None
    sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def random_weights(self) -> bool:
        return self.source == "random"


def describe(model: VisionTransformer, info: ModelInfo) -> dict[str, Any]:
    """The `GET /v1/model` description of a model and its source."""
    return {
        "arch": arch_name(model),
        "patch_size": model.patch_size,
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "num_heads": model.num_heads,
        "img_size": model.img_size,
        "ref_content": model.ref_content,
        "method": info.metadata.get("method"),
        "epoch": info.metadata.get("epoch"),
        "source": info.source,
        "random_weights": info.random_weights,
        "checkpoint": info.checkpoint,
        "checkpoint_sha256": info.sha256,
        "warning": (
            "random weights: the features and attention maps carry no meaning"
            if info.random_weights
            else None
        ),
    }


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata, overlaid by a ``backbone.json`` sidecar if present."""
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata.update(f.metadata() or {})
    sidecar = path.with_name(METADATA_SIDECAR)
    if sidecar.is_file():
        try:
            loaded = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"unreadable {sidecar}: {exc}") from None
        if isinstance(loaded, dict):
            metadata.update({str(k): str(v) for k, v in loaded.items()})
    return metadata


def load_model(
    checkpoint: str | os.PathLike[str] | None,
    *,
    random_weights: bool = False,
    arch: str | None = None,
    patch_size: int = 16,
    seed: int = 0,
    which: str = "teacher",
) -> tuple[VisionTransformer, ModelInfo]:
    """The model to serve and its description.

    Without a checkpoint, random weights are built only when ``random_weights`` is set, so that
    a missing checkpoint is never silently served as noise. ``arch`` None: inferred from the
    checkpoint (a given one is checked against it), ``vit_small`` for random weights; ``which``
    picks the teacher or the student of a training checkpoint.
    """
    if checkpoint is not None:
        if random_weights:
            raise ValueError("give either a checkpoint or random_weights, not both")
        path = Path(checkpoint)
        model = load_backbone(path, arch, which=which)
        info = ModelInfo("checkpoint", path.name, sha256_file(path), checkpoint_metadata(path))
        return model, info
    if not random_weights:
        raise ValueError("no checkpoint given; pass one, or ask for random weights explicitly")
    torch.manual_seed(seed)
    model = build_backbone(arch or DEFAULT_RANDOM_ARCH, patch_size).eval()
    return model, ModelInfo("random", metadata={"seed": str(seed)})

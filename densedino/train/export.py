"""Export of a trained backbone: safetensors + JSON metadata that densedino and timm load, and
an ONNX model for inference."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from densedino.methods.base import SSLMethod
from densedino.models.vit import VisionTransformer
from densedino.train.checkpoint import atomic_write
from densedino.train.onnx_export import ONNX_FILE, export_onnx, onnx_available, require_onnx
from densedino.weights import backbone_metadata, save_backbone

BACKBONE_FILE = "backbone.safetensors"
METADATA_FILE = "backbone.json"

logger = logging.getLogger(__name__)


def export_backbone(
    backbone: VisionTransformer,
    out_dir: str | Path,
    metadata: dict[str, str | int | float],
    onnx: bool = True,
) -> list[Path]:
    """Write ``backbone.safetensors`` (architecture and ``metadata`` in its header),
    ``backbone.json`` (the same, readable) and, with ``onnx``, ``backbone.onnx`` (checked
    against torch, see :func:`densedino.train.onnx_export.export_onnx`) into ``out_dir``.

    Each file appears whole or not at all; the ONNX model is written last, so the weights are
    kept even if its export fails.
    """
    if onnx:
        require_onnx()  # fail before writing anything rather than after
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / BACKBONE_FILE
    tmp = out_dir / f".{BACKBONE_FILE}.tmp"
    save_backbone(backbone, tmp, metadata)
    os.replace(tmp, target)
    header = {**backbone_metadata(backbone), **{k: str(v) for k, v in metadata.items()}}
    atomic_write(out_dir / METADATA_FILE, json.dumps(header, indent=2).encode())
    paths = [target, out_dir / METADATA_FILE]
    if onnx:
        paths.append(export_onnx(backbone, out_dir / ONNX_FILE, metadata))
    return paths


def export_method(method: SSLMethod, out_dir: str | Path, epoch: int, config: str) -> list[Path]:
    """Export the backbone a method is evaluated with (the teacher's for DINO-like methods).

    The ONNX model is written when its optional packages are installed (``densedino[export]``);
    without them the end of a training run only warns, since the weights are what matter.
    """
    metadata = {"method": type(method).__name__, "epoch": epoch, "config": config}
    onnx = onnx_available()
    if not onnx:
        logger.warning("ONNX packages missing (pip install 'densedino[export]'): no %s", ONNX_FILE)
    return export_backbone(method.export_backbone(), out_dir, metadata, onnx=onnx)

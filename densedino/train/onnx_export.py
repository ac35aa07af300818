"""ONNX export of a backbone for inference: dynamic batch and image size, checked with ONNX Runtime.

The graph is the plain ViT (no reference tokens): input ``images`` [B, 3, H, W] float32,
normalised as in training, H and W independent multiples of the patch size; outputs ``cls``
[B, D] and ``patch`` [B, h, w, D] after the final norm, as ``forward_features``.

torch's dynamo exporter is used rather than the TorchScript one: it exports the position
embedding resampling with symbolic sizes, so the ONNX model resamples for each input size as the
backbone's ``pos_interp`` says (DINO's: bicubic ``GridSample`` at the points DINO's
``F.interpolate`` reads; timm's: antialiased bicubic, opset 18 ``Resize``) instead of carrying the
export size's embedding as a constant. :func:`verify_onnx` checks this at sizes other than the
export size.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from densedino.models.vit import VisionTransformer
from densedino.weights import backbone_metadata

if TYPE_CHECKING:
    import onnx_ir

ONNX_FILE = "backbone.onnx"
# The first opset whose Resize has the antialias attribute the position resampling needs.
OPSET = 18
EXPORT_BATCH = 2  # not 1: torch.export would specialise a batch of size 1
REQUIRED_MODULES = ("onnx", "onnxscript", "onnxruntime")


class OnnxVerificationError(RuntimeError):
    """The ONNX model's outputs differ from the torch backbone's."""


def onnx_available() -> bool:
    """Whether the packages the export and its check need are installed."""
    return all(importlib.util.find_spec(name) is not None for name in REQUIRED_MODULES)


def require_onnx() -> None:
    """Raise a clear ImportError when an ONNX export could not run."""
    missing = [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs {', '.join(missing)}: pip install 'densedino[export]' "
            "(or skip the ONNX file: onnx=False, densedino-train export --no-onnx)"
        )


class _Features(nn.Module):
    """``forward_features`` without reference tokens, as a (cls, patch) tuple for export."""

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.backbone.forward_features(images)
        return out["cls"], out["patch"]


def check_shapes(backbone: VisionTransformer) -> list[tuple[int, int, int]]:
    """(batch, height, width) the ONNX model is checked at: the export shape, then two
    non-square sizes with other batches, each side smaller in one and larger in the other
    (the position embedding is both down- and upsampled)."""
    p = backbone.patch_size
    gh, gw = backbone.grid_size
    return [
        (EXPORT_BATCH, gh * p, gw * p),
        (3, (gh + 1) * p, max(gw - 1, 1) * p),
        (1, max(gh - 1, 1) * p, (gw + 2) * p),
    ]


def verify_onnx(
    path: str | Path,
    backbone: VisionTransformer,
    shapes: Sequence[tuple[int, int, int]] | None = None,
    atol: float = 1e-4,
) -> float:
    """Compare the ONNX model (ONNX Runtime, CPU) with the backbone on random images of each
    (batch, height, width); return the largest absolute difference, raise
    :class:`OnnxVerificationError` if it reaches ``atol`` or a shape is wrong."""
    import onnxruntime as ort

    model = copy.deepcopy(backbone).float().cpu().eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch, height, width in shapes or check_shapes(model):
        images = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = model.forward_features(images)
        cls, patch = session.run(["cls", "patch"], {"images": images.numpy()})
        for name, got in (("cls", cls), ("patch", patch)):
            want = expected[name].numpy()
            if got.shape != want.shape:
                raise OnnxVerificationError(
                    f"{path}: output {name} has shape {got.shape} for images "
                    f"{(batch, 3, height, width)}, torch gives {want.shape}"
                )
            diff = float(np.abs(got - want).max())
            if not diff < atol:  # `not <` also catches NaN
                raise OnnxVerificationError(
                    f"{path}: output {name} differs from torch by {diff:.3g} (tolerance {atol:g}) "
                    f"for images {(batch, 3, height, width)}"
                )
            worst = max(worst, diff)
    return worst


def export_onnx(
    backbone: VisionTransformer,
    path: str | Path,
    metadata: Mapping[str, str | int | float] | None = None,
    verify: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write the backbone as an ONNX model (see the module docstring) to ``path``.

    The architecture and ``metadata`` go into the model's metadata properties. With ``verify``
    the file is checked against torch (:func:`verify_onnx`) before it replaces ``path``, so
    ``path`` is only ever a whole, checked model. The backbone itself is not modified.
    """
    require_onnx()
    path = Path(path)
    model = _Features(copy.deepcopy(backbone).float().cpu().eval()).eval()
    p = backbone.patch_size
    gh, gw = backbone.grid_size
    images = torch.zeros(EXPORT_BATCH, 3, gh * p, gw * p)
    h, w = torch.export.Dim("h", min=1), torch.export.Dim("w", min=1)
    program = torch.onnx.export(
        model,
        (images,),
        dynamo=True,
        input_names=["images"],
        output_names=["cls", "patch"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1), 2: p * h, 3: p * w}},
        opset_version=OPSET,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    _describe(program.model, backbone, metadata or {})

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # One self-contained file: a ViT-B is far below protobuf's 2 GB limit.
        program.save(tmp, external_data=False)
        if verify:
            verify_onnx(tmp, backbone, atol=atol)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _describe(
    model: onnx_ir.Model, backbone: VisionTransformer, metadata: Mapping[str, str | int | float]
) -> None:
    """Name the patch grid axes of the output and store the architecture and metadata."""
    patch = next(v for v in model.graph.outputs if v.name == "patch")
    if patch.shape is not None:
        patch.shape = type(patch.shape)([patch.shape[0], "h", "w", patch.shape[3]])
    props = {**backbone_metadata(backbone), **{k: str(v) for k, v in metadata.items()}}
    model.metadata_props.update(props)
    model.graph.doc_string = (
        f"densedino ViT backbone. Input images [batch, 3, {backbone.patch_size}*h, "
        f"{backbone.patch_size}*w] float32, normalised as in training (ImageNet mean/std by "
        "default). Outputs cls [batch, D] and patch [batch, h, w, D] after the final norm."
    )

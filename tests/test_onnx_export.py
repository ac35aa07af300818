"""ONNX export: dynamic batch and image size, equal to torch under ONNX Runtime, atomic."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
import pytest
import torch

from densedino.cli.train import export_parser
from densedino.models.vit import VisionTransformer, build_backbone
from densedino.train import onnx_export
from densedino.train.export import export_backbone, export_method
from densedino.train.onnx_export import (
    ONNX_FILE,
    OnnxVerificationError,
    export_onnx,
    verify_onnx,
)

ATOL = 1e-4


def tiny(
    seed: int, depth: int = 2, img_size: int = 64, pos_interp: str = "dino"
) -> VisionTransformer:
    torch.manual_seed(seed)
    return build_backbone(
        "vit_tiny", 16, depth=depth, img_size=img_size, pos_interp=pos_interp
    ).eval()


@pytest.fixture(scope="module", params=["dino", "timm"])
def exported(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> tuple[VisionTransformer, list[Path]]:
    """Exports under both position interpolations: the graph must resample as the model does."""
    backbone = tiny(0, pos_interp=request.param)
    out = tmp_path_factory.mktemp("export")
    return backbone, export_backbone(backbone, out, {"epoch": 3, "method": "DenseDINO"})


def run_both(backbone: VisionTransformer, path: Path, shape: tuple[int, int, int]):
    batch, height, width = shape
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = backbone.forward_features(images)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cls, patch = session.run(["cls", "patch"], {"images": images.numpy()})
    return (cls, patch), (want["cls"].numpy(), want["patch"].numpy())


def test_export_backbone_writes_all_three_files(exported) -> None:
    _, paths = exported
    out = paths[0].parent
    assert [p.name for p in paths] == ["backbone.safetensors", "backbone.json", ONNX_FILE]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp files


@pytest.mark.parametrize(
    "shape",
    [(2, 64, 64), (3, 32, 112), (1, 80, 48), (1, 16, 16)],
    ids=["export-size", "wide-down-and-up", "tall", "one-patch"],
)
def test_onnx_equals_torch_at_any_batch_and_size(exported, shape) -> None:
    """Sizes other than the export size only agree if the position embedding is resampled in
    the graph (DINO's or timm's, down- and upsampling) rather than stored for 4x4."""
    backbone, paths = exported
    (cls, patch), (want_cls, want_patch) = run_both(backbone, paths[2], shape)
    batch, height, width = shape
    assert cls.shape == (batch, 192)
    assert patch.shape == (batch, height // 16, width // 16, 192)
    assert np.abs(cls - want_cls).max() < ATOL
    assert np.abs(patch - want_patch).max() < ATOL


def test_onnx_interface_and_metadata(exported) -> None:
    backbone, paths = exported
    model = onnx.load(paths[2])
    onnx.checker.check_model(model)

    def dims(value: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    (images,) = model.graph.input
    assert images.name == "images"
    assert images.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch, channels, height, width = dims(images)
    assert isinstance(batch, str) and channels == 3
    assert isinstance(height, str) and isinstance(width, str) and height != width
    outputs = {v.name: dims(v) for v in model.graph.output}
    assert outputs == {"cls": [batch, 192], "patch": [batch, "h", "w", 192]}
    props = {p.key: p.value for p in model.metadata_props}
    assert props["arch"] == "vit_tiny" and props["patch_size"] == "16"
    assert props["pos_interp"] == backbone.pos_interp
    assert props["img_size"] == "64" and props["epoch"] == "3" and props["method"] == "DenseDINO"


def test_verify_rejects_a_model_of_other_weights(exported) -> None:
    backbone, paths = exported
    assert verify_onnx(paths[2], backbone) < ATOL
    with pytest.raises(OnnxVerificationError, match="differs from torch"):
        verify_onnx(paths[2], tiny(1))


def test_failed_check_keeps_the_old_file(exported, tmp_path: Path, monkeypatch) -> None:
    backbone, paths = exported
    # The exporter is replaced by the module's export (the real one takes seconds): what is
    # tested here is the temp file, the check and the rename.
    program = SimpleNamespace(
        model=onnx_ir.load(paths[2]),
        save=lambda path, external_data: onnx_ir.save(program.model, path),
    )
    monkeypatch.setattr(onnx_export.torch.onnx, "export", lambda *a, **kw: program)
    target = tmp_path / ONNX_FILE
    target.write_bytes(b"previous export")
    with pytest.raises(OnnxVerificationError, match="tolerance 0"):
        export_onnx(backbone, target, atol=0.0)  # no difference is < 0
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == [ONNX_FILE]


def test_missing_packages_fail_before_writing(tmp_path: Path, monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        onnx_export.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"onnxscript.*--no-onnx"):
        export_backbone(tiny(0), tmp_path / "a", {})
    assert not (tmp_path / "a").exists()
    paths = export_backbone(tiny(0), tmp_path / "b", {}, onnx=False)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(p.name for p in paths)
    assert ONNX_FILE not in {p.name for p in paths}


def test_end_of_training_export_skips_onnx_with_a_warning_when_packages_miss(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    class Method:
        def export_backbone(self) -> VisionTransformer:
            return tiny(0)

    monkeypatch.setattr("densedino.train.export.onnx_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        paths = export_method(Method(), tmp_path, epoch=1, config="")  # type: ignore[arg-type]
    assert [p.name for p in paths] == ["backbone.safetensors", "backbone.json"]
    assert "densedino[export]" in caplog.text


def test_cli_no_onnx_flag() -> None:
    assert export_parser().parse_args(["ckpt.pth", "out"]).onnx is True
    assert export_parser().parse_args(["ckpt.pth", "out", "--no-onnx"]).onnx is False

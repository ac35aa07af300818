"""The backbone every `densedino-eval` subcommand reads (evaluation/backbone.py): one set of model
options, one loader for densedino checkpoints and timm ViTs (patch 14, registers, layer scale),
what k-NN and the patch protocols read of a timm ViT, cache ids, and the error messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm_vit import EMBED_DIM, PREFIX_TOKENS, TIMM_NAME, random_timm_vit, timm_vit

from densedino.evaluation.backbone import BackboneSpec, patch_tokens
from densedino.evaluation.cli import build_parser
from densedino.models.vit import VisionTransformer
from densedino.weights import save_backbone

SUBCOMMANDS = ("knn", "seg", "hbird", "cluster", "corr")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_timm_vit(tmp_path_factory.mktemp("timm") / "dinov2_s14_reg.safetensors")


def test_timm_backbone_from_a_local_file(weights: Path) -> None:
    backbone = BackboneSpec(timm_name=TIMM_NAME, weights=weights).load()
    assert (backbone.patch_size, backbone.depth, backbone.embed_dim) == (14, 2, EMBED_DIM)
    assert (backbone.kind, backbone.arch) == ("timm", TIMM_NAME)
    assert not any(p.requires_grad for p in backbone.model.parameters())
    images = torch.randn(2, 3, 56, 42)
    feats = backbone.patch_features(images)
    assert feats.shape == (2, 4, 3, EMBED_DIM)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2, 4, 3))
    # timm's own model, built here without densedino: its patch tokens follow CLS + registers.
    with torch.no_grad():
        tokens = timm_vit().forward_features(images)
    want = tokens[:, PREFIX_TOKENS:].reshape(2, 4, 3, -1)
    torch.testing.assert_close(feats, F.normalize(want, dim=-1))
    torch.testing.assert_close(patch_tokens(backbone.model, "timm", 14, images), want)
    first = BackboneSpec(timm_name=TIMM_NAME, weights=weights).load(layer=0)
    assert first.layer == 0 and not torch.allclose(first.patch_features(images), feats)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        backbone.patch_features(torch.randn(1, 3, 56, 48))


def test_knn_reads_the_cls_token_after_the_final_norm(weights: Path) -> None:
    """The k-NN feature of a timm ViT (``model(images)``) is token 0 of forward_features --
    the CLS token after the final norm, ahead of the 4 registers."""
    model = BackboneSpec(timm_name=TIMM_NAME, weights=weights).load().model
    images = torch.randn(3, 3, 42, 56)
    reference = timm_vit()  # built here, not by densedino
    with torch.no_grad():
        tokens = reference.forward_features(images)
        got = model(images)
    assert got.shape == (3, EMBED_DIM)
    torch.testing.assert_close(got, tokens[:, 0])
    for register in range(1, PREFIX_TOKENS):
        assert not torch.allclose(got, tokens[:, register], atol=1e-3)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # it depends on the image


def test_model_ids_key_the_name_and_the_weights(weights: Path, tmp_path: Path) -> None:
    """Caches are keyed by model_id: equal bytes share it wherever the file lies; other
    weights, another timm name or another part of a checkpoint do not."""
    spec = BackboneSpec(timm_name=TIMM_NAME, weights=weights)
    copy = Path(shutil.copy(weights, tmp_path / "copy.safetensors"))
    other = random_timm_vit(tmp_path / "other.safetensors", seed=1)
    assert spec.model_id() == BackboneSpec(timm_name=TIMM_NAME, weights=copy).model_id()
    assert spec.model_id().startswith(f"timm:{TIMM_NAME}:")
    ids = {
        spec.model_id(),
        BackboneSpec(timm_name=TIMM_NAME, weights=other).model_id(),
        BackboneSpec(timm_name="vit_small_patch14_dinov2", weights=weights).model_id(),
        BackboneSpec(checkpoint=weights).model_id(),
        BackboneSpec(checkpoint=weights, which="student").model_id(),
    }
    assert len(ids) == 5


def test_densedino_checkpoint_through_the_same_loader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    backbone = BackboneSpec(checkpoint=save_backbone(vit, tmp_path / "b.safetensors")).load()
    assert (backbone.kind, backbone.patch_size, backbone.embed_dim, backbone.depth) == (
        "densedino", 8, 32, 2,
    )  # fmt: skip
    images = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        want = vit.eval().forward_features(images)
    torch.testing.assert_close(backbone.model(images), want["cls"])
    torch.testing.assert_close(backbone.patch_features(images), F.normalize(want["patch"], dim=-1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timm_name": TIMM_NAME}, "--timm needs --weights FILE"),
        ({"weights": Path("w.pth")}, "--weights goes with --timm NAME"),
        ({}, "no model: give --checkpoint FILE, or --timm NAME --weights FILE"),
        (
            {"checkpoint": Path("c.pth"), "timm_name": TIMM_NAME, "weights": Path("w.pth")},
            "--checkpoint and --timm exclude each other",
        ),
        (
            {"timm_name": TIMM_NAME, "weights": Path("w.pth"), "arch": "vit_small"},
            "--arch applies to --checkpoint",
        ),
        (
            {"timm_name": TIMM_NAME, "weights": Path("w.pth"), "which": "student"},
            "--which applies to --checkpoint",
        ),
    ],
)
def test_option_combinations_that_make_no_sense(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BackboneSpec(**kwargs)


def test_bad_files_and_names_are_clear(weights: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--weights .*missing\.pth does not exist"):
        BackboneSpec(timm_name=TIMM_NAME, weights=tmp_path / "missing.pth").model_id()
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        BackboneSpec(checkpoint=tmp_path / "missing.pth").load()
    with pytest.raises(ValueError, match="does not fit timm's vit_base_patch14_reg4_dinov2"):
        BackboneSpec(timm_name="vit_base_patch14_reg4_dinov2", weights=weights).load()
    with pytest.raises(ValueError, match="timm cannot build 'no_such_vit'"):
        BackboneSpec(timm_name="no_such_vit", weights=weights).load()
    with pytest.raises(ValueError, match=r"--layer must be in \[-2, 2\)"):
        BackboneSpec(timm_name=TIMM_NAME, weights=weights).load(layer=2)
    # A torch.save'd state dict in a DINO-style wrapper loads the same model.
    wrapped = tmp_path / "wrapped.pth"
    torch.save(
        {"teacher": {f"backbone.{k}": v for k, v in timm_vit().state_dict().items()}}, wrapped
    )
    images = torch.randn(1, 3, 28, 28)
    a = BackboneSpec(timm_name=TIMM_NAME, weights=wrapped).load().patch_features(images)
    b = BackboneSpec(timm_name=TIMM_NAME, weights=weights).load().patch_features(images)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_takes_the_same_model_options(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    argv = [command, "--timm", TIMM_NAME, "--weights", "w.pth", "--data", "d"]
    spec = BackboneSpec.from_args(parser.parse_args(argv))
    assert (spec.timm_name, spec.weights, spec.checkpoint) == (TIMM_NAME, Path("w.pth"), None)
    args = parser.parse_args([command, "--checkpoint", "c.pth", "--data", "d"])
    assert BackboneSpec.from_args(args) == BackboneSpec(checkpoint=Path("c.pth"))
    with pytest.raises(ValueError, match="--timm needs --weights"):
        BackboneSpec.from_args(parser.parse_args([command, "--timm", TIMM_NAME, "--data", "d"]))
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--timm NAME" in help_text and "--weights WEIGHTS" in help_text
    assert "vit_small_patch14_reg4_dinov2" in help_text and "pretrained=False" in help_text

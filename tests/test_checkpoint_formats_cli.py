"""A DINO ``main_dino.py`` checkpoint and a DenseDINO authors' checkpoint go through
``densedino-eval knn`` (its CLI entry point) and ``densedino-serve`` / ``densedino-demo`` (the
loaders their CLIs call) with the same features as the source model's own export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_layouts import (
    authors_args,
    dino_training_checkpoint,
    head_state,
    to_authors_backbone,
)
from PIL import Image

from densedino.models.vit import VisionTransformer
from densedino.weights import save_backbone

FORMATS = ("dino", "authors")


def source_model() -> VisionTransformer:
    torch.manual_seed(11)
    return VisionTransformer(
        img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, ref_content="learnable"
    ).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The source model as our safetensors export and in the two foreign layouts."""
    root = tmp_path_factory.mktemp("formats")
    model = source_model()
    state = model.state_dict()
    student = {k: v + 0.1 for k, v in state.items()}  # the teacher is the one evaluated
    out = {"export": save_backbone(model, root / "backbone.safetensors")}
    dino_state = {k: v for k, v in state.items() if k != "ref_token"}
    dino = dino_training_checkpoint(
        {k: v for k, v in student.items() if k != "ref_token"},
        dino_state,
        {"head": head_state(192, 1)},
        {"head": head_state(192, 2)},
    )
    out["dino"] = root / "dino_checkpoint.pth"
    torch.save(dino, out["dino"])
    heads = {"head": head_state(192, 1), "ref_head": head_state(192, 2)}
    authors = dino_training_checkpoint(
        to_authors_backbone(student), to_authors_backbone(state), heads, heads, authors_args()
    )
    out["authors"] = root / "authors_checkpoint.pth"
    torch.save(authors, out["authors"])
    return out


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/val splits of 2 colour classes, 6 + 3 images each, 40 px."""
    root = tmp_path_factory.mktemp("knn-data")
    generator = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                noise = generator.integers(-40, 40, (40, 40, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run_knn(checkpoint: Path, data: Path, out: Path) -> tuple[dict, np.ndarray]:
    from densedino.evaluation import knn_cli

    argv = ["--checkpoint", checkpoint, "--data", data, "--crop", "32", "--k", "1", "3",
            "--batch-size", "6", "--workers", "0", "--out", out / "knn.json", "--quiet",
            "--cache-dir", out / "cache"]  # fmt: skip
    assert knn_cli.main([str(a) for a in argv]) == 0
    result = json.loads((out / "knn.json").read_text())
    features = np.load(Path(result["train"]["cache_path"]) / "features.npy")
    return result, features


@pytest.mark.parametrize("fmt", FORMATS)
def test_knn_cli_reads_the_checkpoint(files, image_folder, tmp_path, fmt):
    want, want_features = run_knn(files["export"], image_folder, tmp_path / "export")
    got, got_features = run_knn(files[fmt], image_folder, tmp_path / fmt)
    assert got["train"]["used"] == 12 and got["val"]["used"] == 6
    np.testing.assert_allclose(got_features, want_features, atol=1e-5, rtol=0)
    assert got["results"] == want["results"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_serve_loader_reads_the_checkpoint(files, fmt):
    from densedino.serve.loading import describe, load_model

    model, info = load_model(files[fmt])
    described = describe(model, info)
    assert (described["arch"], described["depth"], described["img_size"]) == ("vit_tiny", 2, 32)
    assert not described["random_weights"] and described["checkpoint"] == files[fmt].name
    # DINO's ViT has no learnable reference content; the authors' (--with_learnable_token) has.
    assert model.ref_content == ("learnable" if fmt == "authors" else "zero")
    source = source_model()
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model.forward_features(images), source.forward_features(images)
    torch.testing.assert_close(got["cls"], want["cls"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["patch"], want["patch"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_demo_loader_reads_the_checkpoint(files, fmt):
    pytest.importorskip("gradio")
    from densedino.serve.demo import load_model

    model, label = load_model(files[fmt])
    assert "vit_tiny/16" in label and files[fmt].name in label
    torch.testing.assert_close(model.pos_embed, source_model().pos_embed)

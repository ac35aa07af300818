"""`densedino-eval corr`: crop geometry round trips, PCK = 1 when features are the positions
(and lower once they are shuffled), end to end on a coordinate image, and every dense protocol
with a timm ViT (patch 14, register tokens, layer scale) loaded offline from a file (the loader
itself: test_eval_backbone.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm_vit import TIMM_NAME, random_timm_vit

from densedino.data import write_demo_dataset
from densedino.data.eval_transform import denormalize
from densedino.evaluation.cli import main as eval_main
from densedino.evaluation.dense import corr
from densedino.evaluation.dense.data import Crop, random_crop

ANCHORS = torch.stack(
    torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="xy"), -1
).reshape(-1, 2)


def position_features(xy: torch.Tensor, side: float) -> torch.Tensor:
    """Unit features whose cosine similarity falls with distance: RBF on a grid of anchors."""
    d2 = torch.cdist(xy.float() / side, ANCHORS) ** 2
    return F.normalize(torch.exp(-d2 / (2 * 0.05**2)), dim=1)


def test_geometry_round_trip_and_flip() -> None:
    crop = Crop((10.0, 20.0, 50.0, 40.0), True, 16)
    points = torch.tensor([[0.0, 0.0], [8.0, 8.0], [16.0, 4.0]], dtype=torch.float64)
    image = corr.view_to_image(points, crop)
    torch.testing.assert_close(
        image[0], torch.tensor([50.0, 20.0], dtype=torch.float64)
    )  # mirrored
    torch.testing.assert_close(image[1], torch.tensor([30.0, 30.0], dtype=torch.float64))
    torch.testing.assert_close(corr.image_to_view(image, crop), points)


@pytest.mark.parametrize("grid", [8, 14])
def test_pck_is_one_on_positions_and_falls_when_shuffled(grid: int) -> None:
    size = grid * 8
    g = torch.Generator().manual_seed(0)
    acc = corr.CorrAccumulator(size, grid)
    shuffled = corr.CorrAccumulator(size, grid)
    for _ in range(12):
        crop_a, crop_b = (random_crop(96, 128, size, (0.3, 1.0), g) for _ in range(2))
        centres = corr.patch_centres(grid, size)
        feat_a = position_features(corr.view_to_image(centres, crop_a), 128).reshape(grid, grid, -1)
        feat_b = position_features(corr.view_to_image(centres, crop_b), 128).reshape(grid, grid, -1)
        acc.add(corr.match_pair(feat_a, feat_b, crop_a, crop_b), None)
        perm = torch.randperm(grid * grid, generator=g)
        feat_b_shuffled = feat_b.reshape(grid * grid, -1)[perm].reshape(grid, grid, -1)
        shuffled.add(corr.match_pair(feat_a, feat_b_shuffled, crop_a, crop_b), None)
    good, bad = acc.summary()["features"]["all"], shuffled.summary()["features"]["all"]
    assert good["pck@0.1"] == 100.0 and good["err_patches"] < 0.75  # at most half a diagonal
    assert bad["pck@0.1"] < 50.0 and bad["err_patches"] > 2.0
    assert good["points"] == bad["points"] > 0


def test_position_only_matcher_is_exact_without_augmentation() -> None:
    crop = Crop((0.0, 0.0, 64.0, 64.0), False, 64)
    feats = F.normalize(torch.randn(8, 8, 5), dim=-1)
    acc = corr.CorrAccumulator(64, 8)
    acc.add(corr.match_pair(feats, feats, crop, crop), np.zeros((64, 64), np.uint8))
    summary = acc.summary()
    assert summary["position"]["all"]["err_patches"] == pytest.approx(0.0)
    assert summary["features"]["background"]["pck@0.05"] == 100.0
    assert summary["features"]["object"] == {"points": 0}


def test_coordinate_image_end_to_end() -> None:
    """Pixels whose colour is their position: the pipeline (crops, PIL resizing, flips) keeps
    them matched to within a patch; shuffling the patch order of view B breaks it."""
    side = 96
    ys, xs = np.mgrid[0:side, 0:side]
    pixels = np.stack([xs * 255 / (side - 1), ys * 255 / (side - 1), np.zeros_like(xs)], -1)
    image = Image.fromarray(pixels.round().astype(np.uint8))

    class Images:
        def __len__(self) -> int:
            return 12

        def read(self, index: int) -> tuple[Image.Image, None]:
            return image, None

    def patch_fn(views: torch.Tensor, shuffle: bool = False) -> torch.Tensor:
        rgb = denormalize(views)
        pooled = F.avg_pool2d(rgb[:, :2], 8)  # [B, 2, h, w]: the patch's mean (x, y) / side
        b, _, h, w = pooled.shape
        xy = pooled.permute(0, 2, 3, 1).reshape(-1, 2).double() * 128
        feats = position_features(xy, 128).reshape(b, h, w, -1)
        if shuffle:
            perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(1))
            feats[1::2] = (
                feats[1::2].reshape(-1, h * w, feats.shape[-1])[:, perm].reshape(feats[1::2].shape)
            )
        return feats

    kwargs = {"batch_size": 4, "photometric": False, "seed": 0}
    good = corr.evaluate(patch_fn, Images(), 64, **kwargs).summary
    bad = corr.evaluate(lambda v: patch_fn(v, shuffle=True), Images(), 64, **kwargs).summary
    assert good["features"]["all"]["pck@0.1"] == 100.0
    assert bad["features"]["all"]["pck@0.1"] < 50.0


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corr") / "demo"
    write_demo_dataset(root, num_images=120, seed=0, image_size=56, workers=1)
    return root / "VOCdevkit" / "VOC2012"


@pytest.mark.parametrize("protocol", ["corr", "cluster", "hbird"])
def test_every_protocol_runs_a_timm_vit(protocol: str, tiny_demo: Path, tmp_path: Path) -> None:
    weights = random_timm_vit(tmp_path / "w.safetensors")
    out = tmp_path / "out.json"
    argv = [protocol, "--timm", TIMM_NAME, "--weights", weights]
    argv += ["--data", tiny_demo, "--preset", "demo", "--size", "28", "--max-images", "12"]
    argv += ["--out", out, "--work-dir", tmp_path, "--quiet"]
    if protocol == "cluster":
        argv += ["--ks", "11", "20", "--seeds", "2", "--iters", "5", "--restarts", "1"]
    if protocol == "hbird":
        argv += ["--memory", "0", "--epochs", "1", "--k", "5"]
    assert eval_main([str(a) for a in argv]) == 0
    result = json.loads(out.read_text())
    assert result["model"]["patch_size"] == 14 and result["size"] == 28
    assert Path(result["figure"]).is_file()
    if protocol == "corr":
        assert set(result["results"]) == {"features", "position-only", "random-init features"}
        assert {"all", "object", "background"} <= set(result["results"]["features"])


def test_corr_on_a_plain_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No masks needed: any folder of images (here 3 PNGs in a subfolder) gives 'all' only."""
    from densedino.models.vit import VisionTransformer
    from densedino.weights import save_backbone

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    ckpt = save_backbone(vit, tmp_path / "export" / "backbone.safetensors")
    out = tmp_path / "corr.json"
    argv = ["corr", "--checkpoint", ckpt, "--data", tmp_path / "images", "--size", "32"]
    argv += ["--out", out, "--figure-images", "0", "--quiet"]
    assert eval_main([str(a) for a in argv]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 3 and "figure" not in result
    assert set(result["results"]["features"]) == {"all"}
    assert eval_main([str(a) for a in [*argv[:4], tmp_path / "export", *argv[5:]]]) == 2
    assert "densedino-eval corr: error: " in capsys.readouterr().err

"""`densedino-eval seg`: the mmseg backbone and head, the VOC layout, the probe end to end
(mIoU = an independent confusion matrix), checkpoint formats, trained vs random init."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runs import run
from mmengine.config import Config
from PIL import Image
from timm_vit import EMBED_DIM, PREFIX_TOKENS, TIMM_NAME, random_timm_vit, timm_vit

from densedino.data import CLASSES, PALETTE, write_demo_dataset
from densedino.evaluation.seg import cli, probe
from densedino.evaluation.seg.backbone import FrozenViTBackbone
from densedino.evaluation.seg.dataset import (
    VOC_CLASSES,
    PairedRandomResizedCrop,
    resolve_classes,
    resolve_splits,
)
from densedino.evaluation.seg.head import LinearProbeHead
from densedino.models.vit import VisionTransformer
from densedino.weights import load_backbone, save_backbone

NUM_DEMO_CLASSES = len(CLASSES) + 1
# Small runs of the demo protocol: 64 px crops (8 x 8 patches of 8 px), 14 x 14 labels.
FAST = ["--protocol", "demo", "--crop-size", "64", "--workers", "0", "--grid", "6"]
TRAINED_CKPT = os.environ.get("DENSEDINO_SEG_TRAINED_CHECKPOINT")


def tiny_vit(seed: int, depth: int = 2) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=depth, num_heads=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in data at 64 px: 240 trainaug and 60 val images; returns VOC2012/."""
    root = tmp_path_factory.mktemp("seg") / "demo"
    write_demo_dataset(root, num_images=300, seed=0, image_size=64, workers=1)
    return root / "VOCdevkit" / "VOC2012"


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_backbone(tiny_vit(seed=1), tmp_path_factory.mktemp("ckpt") / "random.safetensors")


def run_cli(*argv: object) -> int:
    return cli.main([str(a) for a in argv])


def confusion_miou(voc_root: Path, predictions: Path, num_classes: int) -> tuple[float, np.ndarray]:
    """mIoU (percent) and IoU per class from the saved label PNGs, with numpy only."""
    ids = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for stem in ids:
        truth = np.asarray(Image.open(voc_root / "SegmentationClass" / f"{stem}.png"))
        pred = np.asarray(Image.open(predictions / f"{stem}.png"))
        assert pred.shape == truth.shape and pred.max() < num_classes
        valid = truth != 255
        pairs = truth[valid].astype(np.int64) * num_classes + pred[valid]
        matrix += np.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)
    hits = np.diag(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = hits / (matrix.sum(0) + matrix.sum(1) - hits)
    return 100 * float(np.nanmean(iou)), 100 * iou


# --------------------------------------------------------------------------- mmseg modules
def test_backbone_gives_frozen_patch_map(random_ckpt: Path) -> None:
    from mmseg.registry import MODELS

    backbone = MODELS.build(dict(type="FrozenViTBackbone", checkpoint=str(random_ckpt)))
    assert isinstance(backbone, FrozenViTBackbone)
    backbone.train()  # what the Runner does every epoch
    assert not backbone.vit.training
    assert not any(p.requires_grad for p in backbone.parameters())
    images = torch.randn(2, 3, 48, 64)
    (features,) = backbone(images)
    assert features.shape == (2, 192, 6, 8) and not features.requires_grad
    expected = tiny_vit(seed=1).eval().forward_features(images)["patch"].permute(0, 3, 1, 2)
    torch.testing.assert_close(features, expected)
    # 50 x 60 is no multiple of 8: resized up to 56 x 64, covering the same image.
    assert backbone(torch.randn(1, 3, 50, 60))[0].shape == (1, 192, 7, 8)


def test_dino_checkpoint_and_timm_state_dict(tmp_path: Path) -> None:
    """DINO's training checkpoint (teacher/student, module. prefixes, heads) and a timm
    state dict, both saved with torch.save, give the right backbone inside mmseg."""
    import timm
    from mmseg.registry import MODELS

    teacher, student = tiny_vit(seed=2), tiny_vit(seed=3)
    dino = {
        "teacher": {
            **{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
            "head.mlp.0.weight": torch.randn(8, 192),
        },
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
        "epoch": 100,
    }
    torch.save(dino, tmp_path / "dino.pth")
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, patch_size=8, img_size=32, depth=2, num_classes=0
    ).eval()
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    images = torch.randn(2, 3, 32, 32)

    def patch_map(path: Path, which: str = "teacher") -> torch.Tensor:
        cfg = dict(type="FrozenViTBackbone", checkpoint=str(path), which=which)
        return MODELS.build(cfg)(images)[0]

    with torch.no_grad():
        for model, which in ((teacher, "teacher"), (student, "student")):
            want = model.eval().forward_features(images)["patch"].permute(0, 3, 1, 2)
            torch.testing.assert_close(patch_map(tmp_path / "dino.pth", which), want)
        tokens = ref.forward_features(images)[:, 1:]
        want = tokens.reshape(2, 4, 4, 192).permute(0, 3, 1, 2)
        torch.testing.assert_close(patch_map(tmp_path / "timm.pth"), want)


def test_timm_vit_with_registers_gives_its_patch_map(tmp_path: Path) -> None:
    """--timm NAME --weights FILE inside mmseg: patch 14 and D = 384 are the model's, the map is
    timm's forward_features without CLS and registers on the h x w grid, and a head trains on
    it (the tokens are no inference tensors)."""
    from mmseg.registry import MODELS

    weights = random_timm_vit(tmp_path / "dinov2_s14_reg.safetensors")
    backbone = MODELS.build(dict(type="FrozenViTBackbone", timm=TIMM_NAME, weights=str(weights)))
    backbone.train()
    assert (backbone.patch_size, backbone.embed_dim) == (14, EMBED_DIM)
    assert not backbone.vit.training and not any(p.requires_grad for p in backbone.parameters())
    images = torch.randn(2, 3, 56, 42)
    (features,) = backbone(images)
    assert features.shape == (2, EMBED_DIM, 4, 3) and not features.requires_grad
    with torch.no_grad():
        tokens = timm_vit().forward_features(images)  # timm alone: [CLS, 4 registers, patches]
    want = tokens[:, PREFIX_TOKENS:].reshape(2, 4, 3, EMBED_DIM).permute(0, 3, 1, 2)
    torch.testing.assert_close(features, want)
    # 50 x 60 is no multiple of 14: resized up to 56 x 70, covering the same image.
    assert backbone(torch.randn(1, 3, 50, 60))[0].shape == (1, EMBED_DIM, 4, 5)
    head = torch.nn.Conv2d(EMBED_DIM, 3, 1)
    head(features).sum().backward()
    assert head.weight.grad is not None


def test_cli_builds_the_probe_on_a_timm_vit(demo: Path, tmp_path: Path) -> None:
    from mmseg.registry import MODELS

    weights = random_timm_vit(tmp_path / "w.pth")
    args = cli.build_parser().parse_args(
        ["--timm", TIMM_NAME, "--weights", str(weights), "--data", str(demo), *FAST]
    )
    settings = cli.settings_from_args(args)
    assert settings.work_dir == Path("work_dirs") / "seg" / f"{TIMM_NAME}_demo"
    run = probe.build_probe(settings)
    assert run.backbone["kind"] == "timm" and run.backbone["arch"] == TIMM_NAME
    assert (run.backbone["patch_size"], run.backbone["embed_dim"]) == (14, EMBED_DIM)
    assert run.cfg.model.decode_head.in_channels == EMBED_DIM
    assert run.cfg.model.backbone.timm == TIMM_NAME and run.cfg.model.backbone.checkpoint is None
    assert run.cfg.model.backbone.weights == str(weights.resolve())
    built = MODELS.build(run.cfg.model.backbone)
    images = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        want = timm_vit().forward_features(images)[:, PREFIX_TOKENS:]
    torch.testing.assert_close(built(images)[0], want.reshape(1, 2, 2, -1).permute(0, 3, 1, 2))


def test_head_upsamples_features_before_the_conv() -> None:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    torch.manual_seed(0)
    loss = dict(type="CrossEntropyLoss", avg_non_ignore=True)
    head = LinearProbeHead(16, 5, train_size=(10, 10), init_cfg=None, loss_decode=loss)
    features = torch.randn(2, 16, 4, 4)
    labels = torch.randint(0, 5, (2, 1, 40, 40))
    labels[:, :, :8] = 255
    samples = []
    for label in labels:
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=label)
        samples.append(sample)
    got = head.loss([features], samples, train_cfg={})["loss_ce"]
    # Leopart: bilinear features to 100 x 100 (here 10 x 10), 1x1 conv, nearest labels, CE 255.
    up = F.interpolate(features, size=(10, 10), mode="bilinear", align_corners=False)
    logits = F.conv2d(up, head.conv_seg.weight, head.conv_seg.bias)
    small = F.interpolate(labels.float(), size=(10, 10), mode="nearest").long()[:, 0]
    torch.testing.assert_close(got, F.cross_entropy(logits, small, ignore_index=255))
    # At test time the logits come from the grid and are upsampled: the same map as
    # upsampling the features to the image first (a 1x1 conv commutes with bilinear).
    metas = [dict(img_shape=(32, 32), pad_shape=(32, 32))] * 2
    predicted = head.predict([features], metas, test_cfg={})
    up = F.interpolate(features, size=(32, 32), mode="bilinear", align_corners=False)
    direct = F.conv2d(up, head.conv_seg.weight, head.conv_seg.bias)
    torch.testing.assert_close(predicted, direct, atol=1e-5, rtol=1e-5)


def test_paired_crop_keeps_image_and_labels_aligned() -> None:
    np.random.seed(0)
    # Labels are 16 x 16 blocks; the image carries 20 * label in every channel.
    blocks = np.arange(48, dtype=np.uint8).reshape(6, 8) % 12
    labels = np.kron(blocks, np.ones((16, 16), np.uint8))
    image = np.repeat((labels * 20)[..., None], 3, axis=2)
    crop = PairedRandomResizedCrop(size=64, scale=(0.8, 1.0))
    for _ in range(20):
        out = crop.transform(
            {"img": image.copy(), "gt_seg_map": labels.copy(), "seg_fields": ["gt_seg_map"]}
        )
        assert out["img"].shape == (64, 64, 3) and out["gt_seg_map"].shape == (64, 64)
        assert out["img_shape"] == (64, 64)
        # Inside a block (5 x 5 output neighbourhood of one label), the bilinear image is
        # exactly 20 x the nearest label: image and labels were cropped and scaled alike.
        seg, img = out["gt_seg_map"], out["img"][..., 0].astype(int)
        windows = np.lib.stride_tricks.sliding_window_view(seg, (5, 5))
        inside = np.zeros_like(seg, dtype=bool)
        inside[2:-2, 2:-2] = windows.min(axis=(2, 3)) == windows.max(axis=(2, 3))
        assert inside.mean() > 0.3
        np.testing.assert_array_equal(img[inside], 20 * seg[inside].astype(int))
    boxes = [crop.crop_box(48, 64) for _ in range(200)]
    fractions = [h * w / (48 * 64) for _, _, h, w in boxes]
    assert 0.77 <= min(fractions) and max(fractions) <= 1.0
    assert all(0 <= t and t + h <= 48 and 0 <= s and s + w <= 64 for t, s, h, w in boxes)


# ----------------------------------------------------------------------------- data layout
def test_classes_come_from_the_data(demo: Path, tmp_path: Path) -> None:
    info = resolve_classes(demo)
    assert info.names == ("background", *CLASSES) and not info.is_voc
    assert info.palette == PALETTE and info.source.startswith("meta.json")
    assert resolve_classes(demo, "voc").names == VOC_CLASSES
    assert resolve_classes(demo, "bg, a ,b").names == ("bg", "a", "b")
    with pytest.raises(ValueError, match="distinct"):
        resolve_classes(demo, "bg,bg")
    copy = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(demo, copy)  # the same files without the meta.json above them
    voc = resolve_classes(copy)
    assert voc.is_voc and len(voc.names) == 21 and voc.source == "voc"


def test_trainaug_when_present_else_train(demo: Path, tmp_path: Path) -> None:
    splits = resolve_splits(demo)
    assert (splits.train_list, splits.train_labels) == (
        "ImageSets/Segmentation/trainaug.txt",
        "SegmentationClassAug",
    )
    assert splits.val_labels == "SegmentationClass"
    copy = tmp_path / "VOC2012"
    shutil.copytree(demo, copy)
    shutil.rmtree(copy / "SegmentationClassAug")
    splits = resolve_splits(copy)
    assert (splits.train_split, splits.train_labels) == ("train", "SegmentationClass")
    (copy / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"val\.txt"):
        resolve_splits(copy)


def test_sizes_and_lengths_scale_with_the_protocol() -> None:
    leopart = Config.fromfile(probe.protocol_config("leopart"))
    assert leopart.train_dataloader.batch_size == 60 and leopart.train_cfg.max_epochs == 25
    assert leopart.model.decode_head.train_size == (100, 100)
    probe.set_crop_size(leopart, 128, mask_size=None)
    probe.set_epochs(leopart, 5)
    crop = leopart.train_dataloader.dataset.pipeline[2]
    assert crop.type == "PairedRandomResizedCrop" and crop.size == (128, 128)
    assert leopart.test_dataloader.dataset.pipeline[2].scale == (128, 128)
    assert leopart.model.data_preprocessor.size == (128, 128)
    assert leopart.model.decode_head.train_size == (29, 29)  # 100 / 448 of the crop
    assert leopart.param_scheduler[0].milestones == [4]  # 20 of 25
    with pytest.raises(ValueError, match="--iters"):
        probe.set_epochs(Config.fromfile(probe.protocol_config("linear-bn")), 5)

    bn = Config.fromfile(probe.protocol_config("linear-bn"))
    probe.set_crop_size(bn, 64, mask_size=None)
    probe.set_iters(bn, 400)
    assert bn.model.test_cfg.crop_size == (64, 64) and bn.model.test_cfg.stride == (43, 43)
    assert bn.train_dataloader.dataset.pipeline[2].scale == (256, 64)
    assert bn.model.decode_head.get("train_size") is None
    assert [(s.begin, s.end) for s in bn.param_scheduler] == [(0, 15), (15, 400)]
    with pytest.raises(ValueError, match="Leopart"):
        probe.set_mask_size(bn, 10)


def test_subcommand_registers_on_densedino_eval() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="densedino-eval")
    cli.add_seg_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["seg", "--checkpoint", "c.pth", "--data", "VOC2012"])
    assert args.func is cli.run_seg and args.protocol == "leopart" and args.launcher == "auto"


def test_cli_errors_are_clear(
    demo: Path, random_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--checkpoint", random_ckpt, "--data", demo, "--work-dir", tmp_path / "w"]
    assert run_cli(*base[2:], "--checkpoint", tmp_path / "none.pth") == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert run_cli(*base[:2], "--data", tmp_path, "--work-dir", tmp_path / "w") == 2
    assert "not a Pascal VOC 2012 folder" in capsys.readouterr().err
    assert run_cli(*base, "--protocol", "linear-bn", "--epochs", "2") == 2
    assert "epoch-based protocol" in capsys.readouterr().err
    assert run_cli(*base, *FAST, "--batch-size", "1000") == 2
    assert "fewer than one batch" in capsys.readouterr().err
    assert run_cli(*base, "--cfg-options", "nonsense") == 2
    assert "--cfg-options" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_cli_model_option_errors_are_clear(
    demo: Path, random_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = random_timm_vit(tmp_path / "w.safetensors")
    base = ["--data", demo, "--work-dir", tmp_path / "w"]
    cases = [
        (["--timm", TIMM_NAME], "--timm needs --weights FILE"),
        (["--weights", weights], "--weights goes with --timm NAME"),
        ([], "no model: give --checkpoint FILE, or --timm NAME --weights FILE"),
        (["--checkpoint", random_ckpt, "--timm", TIMM_NAME, "--weights", weights], "exclude"),
        (["--timm", TIMM_NAME, "--weights", tmp_path / "no.pth"], "no.pth does not exist"),
        (["--timm", "vit_base_patch14_reg4_dinov2", "--weights", weights], "does not fit"),
    ]
    for argv, message in cases:
        assert run_cli(*argv, *base) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_probe_end_to_end_equals_numpy_miou(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DINO-format random init, Leopart protocol scaled down: the reported mIoU is the one of
    a confusion matrix over the saved predictions."""
    model = tiny_vit(seed=4)
    checkpoint = tmp_path / "dino_random.pth"
    state = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"teacher": state, "student": state}, checkpoint)
    work = tmp_path / "run"
    argv = ["--checkpoint", checkpoint, "--data", demo, "--work-dir", work, *FAST]
    assert run_cli(*argv, "--epochs", "2") == 0
    table = capsys.readouterr().out
    result = json.loads((work / "seg_results.json").read_text())
    assert result["classes"] == ["background", *CLASSES]
    assert result["train"] == {"split": "trainaug", "labels": "SegmentationClassAug", "images": 240}
    assert result["val"]["images"] == 60 and result["schedule"]["epochs"] == 2
    assert result["schedule"]["lr"] == pytest.approx(0.3 * 16 / 60)  # auto_scale_lr
    assert result["schedule"]["train_label_size"] == [14, 14]
    miou, iou = confusion_miou(demo, Path(result["predictions"]), NUM_DEMO_CLASSES)
    assert result["mIoU"] == pytest.approx(miou, abs=1e-9)
    for name, value in zip(result["classes"], iou, strict=True):
        assert result["per_class_iou"][name] == pytest.approx(value, abs=1e-9)
    assert result["mmseg_metrics"]["mIoU"] == pytest.approx(miou, abs=0.006)  # rounded
    assert 0 < miou < 100 and f"{miou:.2f}" in table and "heart" in table
    with Image.open(result["grid"]) as grid:
        assert grid.format == "PNG" and grid.width >= 600 and grid.height >= 300


def voc_like_copy(demo: Path, dest: Path, size: tuple[int, int] = (64, 44)) -> Path:
    """The demo VOC files cropped to a non-square size, without the meta.json above them:
    to the probe this is Pascal VOC (21 classes, of which the labels use 11)."""
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (dest / sub).mkdir(parents=True)
        for path in (demo / sub).iterdir():
            with Image.open(path) as image:
                image.crop((0, 0, *size)).save(dest / sub / path.name, quality=95)
    shutil.copytree(demo / "ImageSets", dest / "ImageSets")
    return dest


def colour_coded_copy(demo: Path, dest: Path) -> Path:
    """The demo data (root with meta.json) with its scenes repainted so that the colour of a
    pixel tells its class (labels unchanged); returns VOC2012/. Even a random-init backbone's
    patch tokens then carry the answer."""
    shutil.copytree(demo, dest)
    voc = dest / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(NUM_DEMO_CLASSES, 3)).astype(np.float64)
    for path in (voc / "SegmentationClassAug").iterdir():
        labels = np.asarray(Image.open(path))
        image = colours[labels] + rng.normal(0, 8, size=(*labels.shape, 3))
        out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        out.save(voc / "JPEGImages" / f"{path.stem}.jpg", quality=95)
    return voc


@pytest.mark.slow
def test_probe_learns_classes_the_features_carry(
    demo: Path, random_ckpt: Path, tmp_path: Path
) -> None:
    """With colour = class, the probe must segment well: images, labels, crops, the head and
    the scoring line up (a shifted or mislabelled pipeline scores far lower)."""
    data = colour_coded_copy(demo.parents[1], tmp_path / "coded")
    work = tmp_path / "coded_run"
    argv = ["--checkpoint", random_ckpt, "--data", data, "--work-dir", work, *FAST]
    assert run_cli(*argv, "--epochs", "3") == 0
    result = json.loads((work / "seg_results.json").read_text())
    assert result["classes_from"].startswith("meta.json")
    assert result["mIoU"] > 50, result["per_class_iou"]


@pytest.mark.slow
def test_linear_bn_protocol_on_voc_with_a_timm_state_dict(demo: Path, tmp_path: Path) -> None:
    """DINOv2's BN head (iteration-based, sliding window, scored at the original size) from a
    bare timm state dict, on a VOC folder with non-square images (mmseg's PascalVOCDataset)."""
    import timm

    voc = voc_like_copy(demo, tmp_path / "VOCdevkit" / "VOC2012")
    torch.manual_seed(5)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, patch_size=8, img_size=32, depth=2, num_classes=0
    )
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    work = tmp_path / "bn"
    argv = ["--checkpoint", tmp_path / "timm.pth", "--data", voc, "--work-dir", work]
    argv += ["--protocol", "linear-bn", "--crop-size", "32", "--iters", "30"]
    assert run_cli(*argv, "--batch-size", "8", "--workers", "0", "--grid", "0") == 0
    result = json.loads((work / "seg_results.json").read_text())
    assert result["classes"] == list(VOC_CLASSES) and result["classes_from"] == "voc"
    assert result["schedule"]["test_mode"] == "slide" and result["schedule"]["iters"] == 30
    assert result["backbone"]["arch"] == "vit_tiny" and "grid" not in result
    miou, iou = confusion_miou(voc, Path(result["predictions"]), len(VOC_CLASSES))
    assert result["mIoU"] == pytest.approx(miou, abs=1e-9)
    # Classes neither labelled nor predicted (NaN) are left out of the mean, as in mmseg.
    assert np.isnan(iou).sum() == sum(v is None for v in result["per_class_iou"].values())


@pytest.mark.slow
def test_torchrun_two_cpu_processes(demo: Path, random_ckpt: Path, tmp_path: Path) -> None:
    """--launcher pytorch under torchrun: gloo, DDP on CPU, each val image scored once."""
    work = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "densedino.evaluation.seg.cli"]
    command += ["--checkpoint", random_ckpt, "--data", demo, "--work-dir", work, *FAST]
    command += ["--launcher", "pytorch", "--epochs", "1", "--batch-size", "8"]
    run(*command)
    result = json.loads((work / "seg_results.json").read_text())
    assert result["world_size"] == 2 and result["schedule"]["batch_size"] == 16
    assert result["schedule"]["lr"] == pytest.approx(0.3 * 16 / 60)
    predictions = Path(result["predictions"])
    assert len(list(predictions.glob("*.png"))) == result["val"]["images"] == 60
    miou, _ = confusion_miou(demo, predictions, NUM_DEMO_CLASSES)
    assert result["mIoU"] == pytest.approx(miou, abs=1e-9)


@pytest.mark.slow
@pytest.mark.skipif(
    TRAINED_CKPT is None,
    reason="needs a backbone pretrained on the built-in data: set "
    "DENSEDINO_SEG_TRAINED_CHECKPOINT (e.g. the export of densedino-train "
    "configs/demo/densedino_vit-t_demo.py); no pretraining found so far that fits a few CPU "
    "minutes beats random init clearly on this data (docs/benchmarks.md)",
)
def test_trained_checkpoint_beats_random_init(tmp_path: Path) -> None:
    """The demo protocol on the built-in data (128 px): pretrained vs the same ViT at init."""
    root = tmp_path / "demo"
    write_demo_dataset(root, num_images=2000, seed=0, workers=2)
    trained = load_backbone(TRAINED_CKPT)
    torch.manual_seed(0)
    init = VisionTransformer(
        img_size=trained.img_size,
        patch_size=trained.patch_size,
        embed_dim=trained.embed_dim,
        depth=trained.depth,
        num_heads=trained.num_heads,
        ref_content=trained.ref_content,
    )
    miou = {}
    for name, checkpoint in (
        ("trained", Path(TRAINED_CKPT)),
        ("random", save_backbone(init, tmp_path / "init.safetensors")),
    ):
        work = tmp_path / name
        argv = ["--checkpoint", checkpoint, "--data", root / "VOCdevkit" / "VOC2012"]
        assert run_cli(*argv, "--protocol", "demo", "--work-dir", work, "--grid", "0") == 0
        miou[name] = json.loads((work / "seg_results.json").read_text())["mIoU"]
    assert miou["trained"] > miou["random"], miou

"""densedino.plots on synthetic inputs: a fake work dir with scalars, tiny backbones, a VOC folder
and seg grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densedino import build_backbone, plots, save_backbone

METHODS = ("dino", "densedino")
MODELS = ("random-init", *METHODS)


def write_scalars(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def record(step: int, loss: float, **extra: float) -> dict:
    return {"lr": 1e-3, "loss": loss, **extra, "time": 0.5, "epoch": 1, "iter": step, "step": step}


# matplotlib's default colours of the first two lines of an axis (C0, C1).
LINE_COLOURS = ((31, 119, 180), (255, 127, 14))


def count_colour(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    """Pixels of exactly ``colour`` in an RGB picture."""
    return int(np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1).sum())


def assert_picture(path: Path, min_size: tuple[int, int] = (100, 100)) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
    return pixels


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    """A finished main-job work dir in miniature (3 val images of 32 px, depth-1 models)."""
    work = tmp_path / "work"
    rng = np.random.default_rng(0)
    voc = work / plots.VOC_SUBDIR
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "SegmentationClass").mkdir()
    ids = ["000007", "000003", "000005"]
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    for image_id in ids:
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg")
        mask = Image.fromarray(rng.integers(0, 3, (32, 32), dtype=np.uint8), mode="P")
        mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])
        mask.save(voc / "SegmentationClass" / f"{image_id}.png")
    for seed, model in enumerate(MODELS):
        torch.manual_seed(seed)
        net = build_backbone("vit_tiny", 8, depth=1, img_size=32)
        folder = work / "random_init" if model == "random-init" else work / model / "export"
        save_backbone(net, folder / "backbone.safetensors")
        grid = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
        (work / "eval" / f"seg_{model}").mkdir(parents=True)
        Image.fromarray(grid).save(work / "eval" / f"seg_{model}" / "seg_grid.png")
    for k, method in enumerate(METHODS):
        extra = {"loss_ref": 2.0} if method == "densedino" else {}
        write_scalars(
            work / method / "20260101_000000" / "vis_data" / "scalars.json",
            [record(s, 7.0 - 0.1 * s - k, loss_cls=6.0, **extra) for s in (5, 10, 15)],
        )
    knn = {model: {"10": {"top1": 10.0}} for model in MODELS}
    (work / "results.json").write_text(json.dumps({"knn": knn, "seg_miou": {}}))
    return work


def test_training_records_join_resumed_runs(tmp_path: Path) -> None:
    method = tmp_path / "dino"
    write_scalars(method / "20260101_000000" / "vis_data" / "scalars.json",
                  [record(5, 7.0), record(10, 6.5), record(15, 6.4)])  # fmt: skip
    # Resumed from the checkpoint at iteration 10: iteration 15 again, then on; and a record
    # without a loss (e.g. validation) that is not a training iteration.
    write_scalars(method / "20260102_000000" / "vis_data" / "scalars.json",
                  [record(15, 6.0), record(20, 5.0), {"accuracy": 0.5, "step": 20}])  # fmt: skip
    records = plots.training_records(method)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert [r["loss"] for r in records] == [7.0, 6.5, 6.0, 5.0]


def test_loss_series_keeps_total_first_then_components() -> None:
    records = [
        record(1, 3.0, loss_ref=1.0, loss_cls=2.0),
        record(2, 2.0, loss_ref=0.5, loss_cls=1.5),
    ]
    series = plots.loss_series(records)
    assert list(series) == ["loss", "loss_cls", "loss_ref"]
    assert series["loss"] == ([1, 2], [3.0, 2.0])
    assert series["loss_ref"] == ([1, 2], [1.0, 0.5])
    assert plots.loss_series([]) == {}


def test_plot_loss_curves_is_deterministic(tmp_path: Path) -> None:
    losses = {
        "dino": {"loss": ([1, 2, 3], [7.0, 6.0, 5.5])},
        "densedino": {"loss": ([1, 2, 3], [7.0, 6.5, 6.0]), "loss_ref": ([1, 2, 3], [1, 2, 3])},
    }
    first = plots.plot_loss_curves(losses, tmp_path / "a" / "loss.png")
    second = plots.plot_loss_curves(losses, tmp_path / "b" / "loss.png")
    pixels = assert_picture(first, (600, 200))
    assert pixels.shape[1] > 2 * pixels.shape[0]  # three panels side by side
    assert first.read_bytes() == second.read_bytes()
    # The total panel (left third) draws both methods, in matplotlib's first two colours.
    total = pixels[:, : pixels.shape[1] // 3]
    assert count_colour(total, LINE_COLOURS[0]) > 20 and count_colour(total, LINE_COLOURS[1]) > 20
    # Other values draw another picture.
    changed = {**losses, "dino": {"loss": ([1, 2, 3], [7.0, 3.0, 5.5])}}
    other = plots.plot_loss_curves(changed, tmp_path / "c" / "loss.png")
    other_pixels = assert_picture(other, (600, 200))
    assert other_pixels.shape == pixels.shape and not np.array_equal(other_pixels, pixels)
    with pytest.raises(ValueError, match="no method"):
        plots.plot_loss_curves({}, tmp_path / "none.png")


def test_plot_loss_curves_draws_a_method_without_losses(tmp_path: Path) -> None:
    out = plots.plot_loss_curves({"dino": {}}, tmp_path / "loss.png")
    pixels = assert_picture(out)
    # No curve anywhere; the method's panel (right half) says so in its middle.
    assert count_colour(pixels, LINE_COLOURS[0]) == 0
    height, width = pixels.shape[:2]
    middle = pixels[height * 2 // 5 : height * 3 // 5, width * 5 // 8 : width * 7 // 8]
    assert (middle.max(axis=-1) < 100).sum() > 20  # dark text pixels
    drawn = plots.plot_loss_curves({"dino": {"loss": ([1, 2], [2.0, 1.0])}}, tmp_path / "d.png")
    drawn_pixels = assert_picture(drawn)
    assert count_colour(drawn_pixels, LINE_COLOURS[0]) > 20
    middle = drawn_pixels[height * 2 // 5 : height * 3 // 5, width * 5 // 8 : width * 7 // 8]
    assert (middle.max(axis=-1) < 100).sum() == 0  # the check above can fail


def test_input_size_rounds_to_patches() -> None:
    assert plots.input_size(128, 128, 8) == (128, 128)
    assert plots.input_size(100, 30, 16) == (96, 32)
    assert plots.input_size(3, 3, 16) == (16, 16)


def test_cls_attention_maps_match_the_model() -> None:
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 8, depth=1, img_size=32).eval()
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    maps = plots.cls_attention_maps(model, image)
    assert maps.shape == (3, 4, 6)  # 3 heads, 32/8 x 48/8 patches
    assert np.all(maps >= 0) and np.all(maps.sum(axis=(1, 2)) <= 1.0 + 1e-5)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - mean) / std
    with torch.inference_mode():
        expected = model.cls_attention_maps(x)[0].numpy()
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)


def test_val_ids_are_the_first_sorted(work_dir: Path) -> None:
    voc = work_dir / plots.VOC_SUBDIR
    assert plots.val_ids(voc, 2) == ["000003", "000005"]
    with pytest.raises(FileNotFoundError):
        plots.val_ids(work_dir, 2)


def test_attention_figure_layout(work_dir: Path) -> None:
    checkpoints = plots.model_checkpoints(work_dir, METHODS)
    assert list(checkpoints) == list(MODELS)
    figure = plots.attention_figure(checkpoints, work_dir / plots.VOC_SUBDIR, count=2)
    gap = 4
    columns = 2 + 3 * 3  # image, mask, 3 models x 3 heads
    assert figure.shape == (2 * 32 + gap, columns * 32 + (columns - 1) * gap, 3)
    assert figure.dtype == np.uint8

    def tile(row: int, column: int) -> np.ndarray:
        top, left = row * (32 + gap), column * (32 + gap)
        return figure[top : top + 32, left : left + 32]

    voc = work_dir / plots.VOC_SUBDIR
    for row, image_id in enumerate(["000003", "000005"]):
        with Image.open(voc / "JPEGImages" / f"{image_id}.jpg") as image:
            rgb = np.asarray(image.convert("RGB"))
        with Image.open(voc / "SegmentationClass" / f"{image_id}.png") as mask:
            mask_rgb = np.asarray(mask.convert("RGB"))
        # Above the caption (bottom-left), the first tiles are the image and its mask.
        np.testing.assert_array_equal(tile(row, 0)[:8], rgb[:8])
        np.testing.assert_array_equal(tile(row, 1)[:8], mask_rgb[:8])
        # Each model (its own random weights) shows its own maps over the same image.
        models = [tile(row, 2 + 3 * m)[:8] for m in range(3)]
        assert not np.array_equal(models[0], models[1]) and not np.array_equal(models[1], models[2])


def test_attention_row_puts_the_heat_where_the_attention_is() -> None:
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    heads = np.full((2, 4, 4), 0.01)
    heads[0, 1, 2] = 1.0  # head 0 looks at patch (row 1, column 2), head 1 at (0, 3)
    heads[1, 0, 3] = 1.0
    tiles = plots.attention_row(image, None, "id", {"model": heads})
    assert len(tiles) == 1 + 2 and all(t.shape == (64, 64, 3) for t in tiles)
    for tile, peak in zip(tiles[1:], [(1, 2), (0, 3)], strict=True):
        # Mean brightness of each 16 x 16 patch; the caption only covers the bottom rows.
        brightness = tile[:32].astype(float).sum(-1).reshape(2, 16, 4, 16).mean(axis=(1, 3))
        assert np.unravel_index(brightness.argmax(), brightness.shape) == peak
        assert brightness.max() > 2 * np.sort(brightness, axis=None)[-2]


def test_copy_seg_grids_and_missing_grid(work_dir: Path, tmp_path: Path) -> None:
    out = plots.copy_seg_grids(work_dir, MODELS, tmp_path / "figures")
    assert [p.name for p in out] == [f"seg_predictions_{m}.png" for m in MODELS]
    source = work_dir / "eval" / "seg_dino" / "seg_grid.png"
    assert out[1].read_bytes() == source.read_bytes()
    with pytest.raises(FileNotFoundError, match="no seg prediction grid of other"):
        plots.copy_seg_grids(work_dir, ["other"], tmp_path / "figures")


def test_seg_grid_path_follows_the_results_json(work_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere.png"
    moved.write_bytes(b"png")
    (work_dir / "eval" / "seg_dino.json").write_text(json.dumps({"grid": str(moved)}))
    assert plots.seg_grid_path(work_dir, "dino") == moved
    assert plots.seg_grid_path(work_dir, "densedino").name == "seg_grid.png"


def test_pretrained_methods(work_dir: Path) -> None:
    assert plots.pretrained_methods(work_dir) == list(METHODS)  # the results' order
    (work_dir / "results.json").unlink()
    assert plots.pretrained_methods(work_dir) == sorted(METHODS)  # those with scalars


def test_cli_writes_every_figure_deterministically(
    work_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert plots.main(["--work-dir", str(work_dir), "--images", "3"]) == 0
    printed = capsys.readouterr().out.split()
    names = ["loss_curves.png", "attention_maps.png"]
    names += [f"seg_predictions_{m}.png" for m in MODELS]
    assert printed == [str(work_dir / "figures" / n) for n in names]
    before = {n: (work_dir / "figures" / n).read_bytes() for n in names}
    for name in names[:2]:
        assert_picture(work_dir / "figures" / name)
    assert plots.main(["--work-dir", str(work_dir), "--images", "3"]) == 0
    assert before == {n: (work_dir / "figures" / n).read_bytes() for n in names}


def test_cli_reports_a_work_dir_without_methods(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert plots.main(["--work-dir", str(tmp_path)]) == 2
    assert "no pretrained method" in capsys.readouterr().err

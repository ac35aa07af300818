"""The built-in procedural dataset: scenes, masks, both on-disk layouts, CLI and preview."""

from __future__ import annotations

import colorsys
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densedino.data import (
    CLASSES,
    IGNORE_INDEX,
    PALETTE,
    DemoDatasetInfo,
    render_scene,
    save_preview,
    scene_rng,
    write_demo_dataset,
)
from densedino.data import cli as data_cli
from densedino.data.constants import voc_palette
from densedino.data.demo_dataset import label_of_index, min_num_images
from densedino.data.synthetic import SHAPES, class_style, compose_layout

SIZE = 64  # small images keep the tests fast; the layout code does not depend on the size
NUM_IMAGES = 40
SEEDS = range(24)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> DemoDatasetInfo:
    root = tmp_path_factory.mktemp("demo") / "data"
    return write_demo_dataset(root, num_images=NUM_IMAGES, seed=3, image_size=SIZE, workers=1)


def _voc(info: DemoDatasetInfo) -> Path:
    return info.voc_root


def _read_list(info: DemoDatasetInfo, name: str) -> list[str]:
    return (_voc(info) / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()


def _index_of(stem: str) -> int:
    return int(stem)


def _rendered(info: DemoDatasetInfo, stem: str) -> tuple[np.ndarray, np.ndarray, int]:
    index = _index_of(stem)
    return render_scene(scene_rng(info.seed, index), info.image_size, label_of_index(index))


def _block_means(image: np.ndarray, block: int = 4) -> np.ndarray:
    height, width, _ = image.shape
    shaped = image.astype(np.float64).reshape(height // block, block, width // block, block, 3)
    return shaped.mean(axis=(1, 3))


def _all_files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


# ---------------------------------------------------------------------------- class metadata


def test_classes_are_sorted_shapes_with_voc_palette() -> None:
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10
    assert list(CLASSES) == sorted(CLASSES)  # ImageFolder index order == CLASSES order
    assert tuple(SHAPES) == CLASSES
    assert len(PALETTE) == len(CLASSES) + 1
    full = voc_palette()
    assert full[0] == (0, 0, 0) and full[1] == (128, 0, 0) and full[2] == (0, 128, 0)
    assert full[15] == (192, 128, 128) and full[255] == (224, 224, 192)
    assert list(PALETTE) == full[: len(PALETTE)]


# ----------------------------------------------------------------------------------- scenes


def test_render_scene_is_deterministic() -> None:
    first = render_scene(7, SIZE)
    again = render_scene(np.random.default_rng(7), SIZE)
    other = render_scene(8, SIZE)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(scene_rng(0, 1).random(4), scene_rng(0, 2).random(4))


def test_render_scene_types_and_label_rules() -> None:
    object_counts = []
    for seed in SEEDS:
        label = seed % len(CLASSES)
        image, mask, got = render_scene(seed, SIZE, label=label)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
        assert got == label
        values = set(np.unique(mask).tolist())
        assert values <= set(range(len(CLASSES) + 1))
        counts = np.bincount(mask.ravel(), minlength=len(CLASSES) + 1)
        assert int(np.argmax(counts[1:])) == label  # largest visible area
        assert sorted(counts[1:])[-1] > sorted(counts[1:])[-2]  # and strictly so
        object_counts.append(len(values - {0}))
    assert min(object_counts) >= 1 and max(object_counts) <= 4
    assert np.mean(object_counts) >= 2.0  # multi-object scenes, not single shapes
    # Objects cover a decent part of the image on average.
    coverage = np.mean([(render_scene(s, SIZE)[1] > 0).mean() for s in SEEDS])
    assert 0.15 < coverage < 0.7


def test_random_label_is_valid_and_all_classes_occur() -> None:
    labels = {render_scene(seed, SIZE)[2] for seed in range(60)}
    assert labels == set(range(len(CLASSES)))
    with pytest.raises(ValueError, match="label"):
        render_scene(0, SIZE, label=len(CLASSES))
    with pytest.raises(ValueError, match="image_size"):
        render_scene(0, 8)


def test_mask_follows_painting_order_and_classes_are_distinct() -> None:
    for seed in SEEDS:
        layout = compose_layout(np.random.default_rng(seed), SIZE, main_class=seed % 10)
        assert len(set(layout.classes)) == len(layout.classes)  # distinct classes per image
        repainted = np.zeros((SIZE, SIZE), dtype=np.uint8)
        for region, class_index in zip(layout.regions, layout.classes, strict=True):
            repainted[region] = class_index + 1
        assert np.array_equal(repainted, layout.mask)
        _, mask, _ = render_scene(seed, SIZE, label=seed % 10)
        assert np.array_equal(mask, layout.mask)  # render_scene draws the same layout
        for region, class_index in zip(layout.regions, layout.classes, strict=True):
            assert (layout.mask == class_index + 1).sum() >= 0.4 * region.sum()  # visible


@pytest.mark.parametrize("appearance", ["class", "random"])
def test_objects_stand_out_from_the_background(appearance: str) -> None:
    for seed in SEEDS:
        image, mask, _ = render_scene(seed, SIZE, appearance=appearance)
        pixels = image.reshape(-1, 3).astype(np.float64)
        flat = mask.ravel()
        background = pixels[flat == 0].mean(axis=0)
        for value in set(np.unique(flat).tolist()) - {0}:
            distance = np.linalg.norm(pixels[flat == value].mean(axis=0) - background)
            assert distance > 20.0, (seed, value, distance)


def _hue_of_class(image: np.ndarray, mask: np.ndarray, class_index: int) -> float:
    mean = image[mask == class_index + 1].reshape(-1, 3).mean(axis=0) / 255.0
    return colorsys.rgb_to_hsv(*mean)[0]


def test_class_appearance_ties_colour_to_the_class_and_random_does_not() -> None:
    """Under "class" most objects have a hue near their class's; under "random" about as many
    as chance (2 x 0.05 of the hue circle) do."""

    def share_near_class_hue(appearance: str) -> float:
        near = []
        for seed in range(60):
            image, mask, label = render_scene(seed, SIZE, appearance=appearance)
            target, _ = class_style(label)
            gap = abs(_hue_of_class(image, mask, label) - target)
            near.append(min(gap, 1.0 - gap) < 0.05)
        return float(np.mean(near))

    assert share_near_class_hue("class") > 0.6
    assert share_near_class_hue("random") < 0.3
    _, mask_random, _ = render_scene(7, SIZE, appearance="random")
    _, mask_class, _ = render_scene(7, SIZE, appearance="class")
    assert np.array_equal(mask_random, mask_class)  # appearance never moves the objects
    with pytest.raises(ValueError, match="appearance"):
        render_scene(0, SIZE, appearance="fancy")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- on disk


def test_imagenet_layout_reads_with_image_folder(dataset: DemoDatasetInfo) -> None:
    from torchvision.datasets import ImageFolder

    train, val = ImageFolder(str(dataset.imagenet_train)), ImageFolder(str(dataset.imagenet_val))
    assert train.classes == list(CLASSES) and val.classes == list(CLASSES)
    assert len(train) == dataset.num_train and len(val) == dataset.num_val
    assert dataset.num_train + dataset.num_val == NUM_IMAGES
    for folder, counts in ((train, dataset.train_class_counts), (val, dataset.val_class_counts)):
        histogram = np.bincount(folder.targets, minlength=len(CLASSES))
        assert histogram.tolist() == [counts[name] for name in CLASSES]
        assert histogram.min() >= 1  # every class in every split
    image, target = train[0]
    assert image.size == (SIZE, SIZE) and target == 0


def test_folder_label_is_largest_class_of_the_mask(dataset: DemoDatasetInfo) -> None:
    for split_dir in (dataset.imagenet_train, dataset.imagenet_val):
        for path in split_dir.glob("*/*.jpg"):
            aug_path = _voc(dataset) / "SegmentationClassAug" / f"{path.stem}.png"
            aug = np.asarray(Image.open(aug_path))
            counts = np.bincount(aug.ravel(), minlength=len(CLASSES) + 1)[1:]
            assert CLASSES[int(np.argmax(counts))] == path.parent.name
            assert path.read_bytes() == (_voc(dataset) / "JPEGImages" / path.name).read_bytes()


def test_voc_masks_match_rendered_masks_with_ignore_border(dataset: DemoDatasetInfo) -> None:
    for stem in _read_list(dataset, "val")[:4] + _read_list(dataset, "trainaug")[:4]:
        image, mask, _ = _rendered(dataset, stem)
        voc_png = Image.open(_voc(dataset) / "SegmentationClass" / f"{stem}.png")
        aug_png = Image.open(_voc(dataset) / "SegmentationClassAug" / f"{stem}.png")
        assert voc_png.mode == "P" and aug_png.mode == "L"
        assert voc_png.getpalette()[: 3 * len(PALETTE)] == [c for rgb in PALETTE for c in rgb]
        voc, aug = np.asarray(voc_png), np.asarray(aug_png)
        assert np.array_equal(aug, mask) and IGNORE_INDEX not in aug
        labelled = voc != IGNORE_INDEX
        assert np.array_equal(voc[labelled], mask[labelled])
        ignored = np.argwhere(~labelled)
        assert 0 < len(ignored) < 0.35 * mask.size  # a thin band, not whole regions
        for y, x in ignored:  # every 255 sits within 1 px of a label change
            window = mask[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
            assert len(np.unique(window)) > 1, (stem, y, x)
        # and every pixel with a 4-neighbour of another label is ignored
        change_x = mask[:, 1:] != mask[:, :-1]
        assert np.all(voc[:, 1:][change_x] == IGNORE_INDEX)
        assert np.all(voc[:, :-1][change_x] == IGNORE_INDEX)
        jpeg = np.asarray(Image.open(_voc(dataset) / "JPEGImages" / f"{stem}.jpg"), np.float64)
        # The JPEG is this scene: compared on 4x4 block means, which JPEG keeps (its loss is
        # in fine texture), it is far closer to it than to another scene.
        error = np.abs(_block_means(jpeg) - _block_means(image)).mean()
        unrelated = np.abs(_block_means(jpeg) - _block_means(render_scene(99, SIZE)[0])).mean()
        assert error < 6.0 < unrelated


def test_voc_split_lists(dataset: DemoDatasetInfo) -> None:
    train, trainaug, val = (_read_list(dataset, n) for n in ("train", "trainaug", "val"))
    assert set(train) < set(trainaug)  # strict superset, as in real VOC + SBD
    assert not set(trainaug) & set(val)
    assert len(train) == len(set(train)) and len(val) == len(set(val))
    assert sorted(trainaug + val) == [f"{i:06d}" for i in range(NUM_IMAGES)]
    assert (len(train), len(trainaug), len(val)) == (
        dataset.num_voc_train,
        dataset.num_voc_trainaug,
        dataset.num_voc_val,
    )
    for stem in trainaug + val:
        for sub, suffix in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
            assert (_voc(dataset) / sub / f"{stem}.{suffix}").is_file()
        assert (_voc(dataset) / "SegmentationClassAug" / f"{stem}.png").is_file()
    imagenet_val = {p.stem for p in dataset.imagenet_val.glob("*/*.jpg")}
    assert imagenet_val == set(val)


def test_meta_and_readme(dataset: DemoDatasetInfo) -> None:
    meta = json.loads((dataset.root / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["seed"] == 3
    assert meta["num_train"] == dataset.num_train and meta["num_val"] == dataset.num_val
    assert meta["image_size"] == SIZE and meta["ignore_index"] == IGNORE_INDEX
    assert meta["appearance"] == "class" and meta["generator_version"] == 2
    assert "circle" in (dataset.root / "README.txt").read_text()


def test_output_is_deterministic_across_workers_and_seeds(tmp_path: Path) -> None:
    kwargs = dict(num_images=30, image_size=48)
    one = write_demo_dataset(tmp_path / "one", seed=5, workers=1, **kwargs)
    two = write_demo_dataset(tmp_path / "two", seed=5, workers=2, **kwargs)
    other = write_demo_dataset(tmp_path / "other", seed=6, workers=1, **kwargs)
    files_one, files_two = _all_files(one.root), _all_files(two.root)
    assert files_one == files_two  # byte-identical, whatever the number of workers
    files_other = _all_files(other.root)
    assert files_other.keys() == files_one.keys()  # same ids and labels (labels cycle by index)
    jpeg = "VOCdevkit/VOC2012/JPEGImages/000000.jpg"
    assert files_other[jpeg] != files_one[jpeg]


def test_refuses_non_empty_root_and_overwrites_on_request(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_demo_dataset(root, num_images=30, image_size=32, workers=1)
    assert (root / "keep.txt").is_file()
    info = write_demo_dataset(root, num_images=30, image_size=32, workers=1, overwrite=True)
    assert not (root / "keep.txt").exists() and info.num_images == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp dirs left behind


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        write_demo_dataset(tmp_path / "a", num_images=100, val_fraction=1.0)
    with pytest.raises(ValueError, match="num_images"):
        write_demo_dataset(tmp_path / "b", num_images=min_num_images(0.2) - 1)
    with pytest.raises(ValueError, match="workers"):
        write_demo_dataset(tmp_path / "c", num_images=100, workers=0)
    with pytest.raises(ValueError, match="appearance"):
        write_demo_dataset(tmp_path / "e", num_images=100, appearance="fancy")
    assert not any(tmp_path.iterdir())  # nothing written on bad input


def test_min_num_images_is_tight(tmp_path: Path) -> None:
    minimum = min_num_images(0.5)
    info = write_demo_dataset(
        tmp_path / "d", num_images=minimum, val_fraction=0.5, image_size=32, workers=1
    )
    assert min(info.val_class_counts.values()) == 1 and min(info.train_class_counts.values()) == 1


# ----------------------------------------------------------------------- preview and CLI


def test_save_preview_writes_a_grid(dataset: DemoDatasetInfo, tmp_path: Path) -> None:
    out = save_preview(dataset, tmp_path / "preview.png", n=3)
    with Image.open(out) as image:
        width, height = image.size
    assert width > height > 100  # 3 columns of image over mask
    with pytest.raises(FileNotFoundError):
        save_preview(tmp_path, tmp_path / "x.png")


def test_cli_writes_dataset_and_prints_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cli"
    argv = [str(root), "--num-images", "30", "--image-size", "32", "--workers", "1", "--quiet"]
    assert data_cli.main([*argv, "--seed", "2"]) == 0
    out = capsys.readouterr().out
    # 3 images per class; the stratified split sends the third of each class to val.
    assert "imagenet: train 20, val 10" in out and "triangle" in out
    with pytest.raises(SystemExit) as error:  # non-empty root without --overwrite
        data_cli.main(argv)
    assert error.value.code == 2
    assert "overwrite" in capsys.readouterr().err


def test_cli_runs_as_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "densedino.data.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and "--num-images" in result.stdout


# --------------------------------------------------------------------------- mmsegmentation


def test_voc_layout_reads_with_mmseg(dataset: DemoDatasetInfo) -> None:
    pytest.importorskip("mmseg")
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets import PascalVOCDataset
    from mmseg.datasets.transforms import LoadAnnotations

    voc = PascalVOCDataset(
        data_root=str(_voc(dataset)),
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClass"),
        ann_file="ImageSets/Segmentation/val.txt",
        pipeline=[LoadImageFromFile(), LoadAnnotations()],
    )
    assert len(voc) == dataset.num_voc_val
    for index in range(3):
        sample = voc[index]
        stem = Path(sample["img_path"]).stem
        png = np.asarray(Image.open(_voc(dataset) / "SegmentationClass" / f"{stem}.png"))
        assert np.array_equal(sample["gt_seg_map"], png)
        assert sample["img"].shape == (SIZE, SIZE, 3)

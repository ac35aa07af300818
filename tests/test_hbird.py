"""`densedino-eval hbird`: soft patch labels, class-balanced sampling and label transfer against
direct implementations, mIoU on one confusion matrix, and the CLI on a tiny built-in dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densedino.data import write_demo_dataset
from densedino.evaluation.cli import main as eval_main
from densedino.evaluation.dense import hbird
from densedino.evaluation.dense.metrics import ConfusionMatrix, miou
from densedino.evaluation.knn import BankSearch
from densedino.models.vit import VisionTransformer
from densedino.weights import save_backbone


def test_patch_label_fractions_by_hand() -> None:
    mask = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 2, 1, 255],
            [255, 255, 2, 2],
            [255, 255, 2, 0],
        ]
    )[None]
    got = hbird.patch_label_fractions(mask, patch=2, num_classes=3)
    assert got.shape == (1, 2, 2, 3)
    torch.testing.assert_close(got[0, 0, 0], torch.tensor([3 / 4, 0, 1 / 4]))
    torch.testing.assert_close(got[0, 0, 1], torch.tensor([0, 1.0, 0]))  # 255 ignored: 3 of 3
    torch.testing.assert_close(got[0, 1, 0], torch.zeros(3))  # all ignored: no label
    torch.testing.assert_close(got[0, 1, 1], torch.tensor([1 / 4, 0, 3 / 4]))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        hbird.patch_label_fractions(torch.full((1, 2, 2), 7), 2, 3)


def test_balanced_scores_by_hand() -> None:
    # Patches: {0}, {0}, {0, 1}, {} (ignored). Class 0 is in 3 patches, class 1 in 1.
    fractions = torch.tensor([[1.0, 0], [1.0, 0], [0.5, 0.5], [0, 0]])
    scores = hbird.balanced_patch_scores(fractions)
    assert scores.tolist() == [3.0, 3.0, 4.0, float("inf")]
    # Rare classes first: the one patch of a rare class is kept far more often than the
    # 2 / 16 of uniform sampling (score 1 x U against 15 x U for the 15 others).
    fractions = torch.tensor([[1.0, 0]] * 15 + [[0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    kept = [hbird.balanced_patch_sample(fractions, 2, generator).tolist() for _ in range(400)]
    assert all(len(set(k)) == 2 for k in kept)
    assert sum(15 in k for k in kept) / len(kept) > 0.75
    with pytest.raises(ValueError, match="count"):
        hbird.balanced_patch_sample(fractions, 17, torch.Generator())


def test_label_transfer_equals_a_direct_loop() -> None:
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.softmax(torch.randn(50, 4, generator=g), dim=1)
    queries = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    k, temperature = 5, 0.02
    sims, ids = BankSearch(bank.numpy()).search(queries.numpy(), k)
    got = hbird.transfer_labels(
        torch.from_numpy(sims), torch.from_numpy(ids).long(), labels, temperature
    )
    for q in range(len(queries)):  # by hand: all similarities, top k, softmax, weighted mean
        all_sims = [float(queries[q] @ bank[i]) for i in range(len(bank))]
        top = sorted(range(len(bank)), key=lambda i: -all_sims[i])[:k]
        weights = np.exp([all_sims[i] / temperature for i in top])
        weights /= weights.sum()
        want = sum(w * labels[i].numpy() for w, i in zip(weights, top, strict=True))
        np.testing.assert_allclose(got[q].numpy(), want, rtol=1e-4, atol=1e-6)


def test_predict_upsamples_bilinearly_then_argmaxes() -> None:
    # Two memory patches: class 0 at feature e0, class 1 at e1; k = 1.
    bank = np.eye(2, dtype=np.float32)
    labels = torch.eye(2)
    features = torch.tensor([[[1.0, 0], [0, 1.0]]])[:, None]  # [1, 1, 2, 2]: left 0, right 1
    out = hbird.predict(features, BankSearch(bank), labels, (4, 8), k=1)
    assert out.shape == (1, 4, 8)
    assert (out[:, :, :4] == 0).all() and (out[:, :, 4:] == 1).all()


def test_miou_is_one_confusion_matrix_over_the_set() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1, 255]), np.array([0, 1, 1, 2]))
    cm.update(np.array([2, 2]), np.array([2, 0]))
    # class 0: I 1, U 3; class 1: I 1, U 2; class 2: I 1, U 2 (the ignored pixel does not count).
    assert miou(cm.matrix) == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 2) / 3)


def oracle_patch_fn(num_classes: int, patch: int):
    """A 'backbone' whose patch feature is the one-hot of the class the patch's colour codes."""

    def patch_fn(images: torch.Tensor) -> torch.Tensor:
        codes = images[:, 0].round().long().clamp(0, num_classes - 1)  # channel 0 = class id
        pooled = F.avg_pool2d(F.one_hot(codes, num_classes).permute(0, 3, 1, 2).float(), patch)
        return F.normalize(pooled.permute(0, 2, 3, 1) + 1e-3, dim=-1)

    return patch_fn


def test_oracle_features_segment_perfectly() -> None:
    g = torch.Generator().manual_seed(0)
    num_classes, patch = 3, 4
    masks = (
        torch.randint(0, num_classes, (6, 4, 4), generator=g)
        .repeat_interleave(4, 1)
        .repeat_interleave(4, 2)
    )
    images = masks[:, None].float().expand(-1, 3, -1, -1)
    patch_fn = oracle_patch_fn(num_classes, patch)
    batches = [(images[:3], masks[:3], None), (images[3:], masks[3:], None)]
    memory = hbird.build_memory(
        patch_fn, [batches], patch, num_classes, per_image=None, capacity=96
    )
    assert len(memory) == 96 and memory.images == 6
    result = hbird.evaluate(patch_fn, memory, batches, num_classes, k=5, keep_examples=6)
    # Every neighbour has the query's class: the transferred label is the patch's one-hot;
    # bilinear upsampling then argmax (corners flip to the majority of their 4 neighbours).
    patch_classes = masks[:, ::patch, ::patch]
    onehot = F.one_hot(patch_classes, num_classes).permute(0, 3, 1, 2).float()
    want = F.interpolate(onehot, size=(16, 16), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(torch.stack([pred for _, _, pred in result.examples]), want)
    cm = ConfusionMatrix(num_classes)
    cm.update(masks.numpy(), want.numpy())
    assert result.miou == pytest.approx(miou(cm.matrix)) and result.miou > 80
    bounded = hbird.build_memory(
        patch_fn, [batches], patch, num_classes, per_image=4, capacity=24, seed=1
    )
    assert len(bounded) == 24


def test_cli_on_the_built_in_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "demo"
    write_demo_dataset(root, num_images=120, seed=0, image_size=32, workers=1)
    torch.manual_seed(0)
    ckpt = save_backbone(
        VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2),
        tmp_path / "random.safetensors",
    )
    out = tmp_path / "hbird.json"
    voc = root / "VOCdevkit" / "VOC2012"
    argv = ["hbird", "--checkpoint", ckpt, "--data", voc, "--preset", "demo", "--size", "32"]
    argv += ["--memory", "400", "--out", out, "--work-dir", tmp_path / "work", "--quiet"]
    assert eval_main([str(a) for a in argv]) == 0
    result = json.loads(out.read_text())
    assert result["memory"] <= 400 and result["patches_per_image"] >= 1
    assert 0 < result["results"]["mIoU"] <= 100
    assert (tmp_path / "work" / "hbird.png").is_file()
    assert eval_main([str(a) for a in [*argv[:7], "--size", "30"]]) == 2
    assert "multiple of the patch size" in capsys.readouterr().err

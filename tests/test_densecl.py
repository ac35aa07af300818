"""DenseCL: InfoNCE by hand, the queue (wrap-around, overflow, all ranks' keys), the dense
correspondence on a constructed example, the method's losses against a per-location loop, the
key encoder, and a short CLI run with export, k-NN and the segmentation probe."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_runs import assert_export_evaluates, logged, mean, run, small_run_config
from tiny import TINY_DENSECL

from densedino.data.collate import collate_views
from densedino.data.view_config import ViewConfig
from densedino.data.views import MultiViewTransform
from densedino.losses import KeyQueue, dense_correspondence, info_nce
from densedino.methods import DenseCL
from densedino.methods.base import StepState


@pytest.fixture(scope="module")
def batch() -> dict:
    """Query and key views of 32 px (4 x 4 patches) of 3 images."""
    views = ViewConfig(num_global=2, global_size=32, num_points=1, photometric=False)
    generator = torch.Generator().manual_seed(0)
    transform = MultiViewTransform(views)
    images = torch.randint(0, 256, (3, 3, 48, 64), dtype=torch.uint8, generator=generator)
    return collate_views([transform(img, generator=generator) for img in images])


# ----------------------------------------------------------------------------------- InfoNCE
def test_info_nce_by_hand() -> None:
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.6, -0.8]])
    got = info_nce(query, positive, negatives, temperature=0.2)
    # Row 0: positive 0.8, negatives 0, -1, 0.6. Row 1: positive 1, negatives 1, 0, -0.8.
    row0 = -math.log(math.exp(4) / (math.exp(4) + math.exp(0) + math.exp(-5) + math.exp(3)))
    row1 = -math.log(math.exp(5) / (math.exp(5) + math.exp(5) + math.exp(0) + math.exp(-4)))
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert row0 == pytest.approx(0.32665, abs=1e-5)
    with pytest.raises(ValueError, match="negatives"):
        info_nce(query, positive, negatives[:, :1], 0.2)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(query, positive, negatives, 0.0)


# ------------------------------------------------------------------------------------- queue
def test_queue_starts_with_random_unit_keys() -> None:
    queue = KeyQueue(dim=8, size=6)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(6))
    assert int(queue.ptr) == 0
    assert set(queue.state_dict()) == {"keys", "ptr"}  # saved with checkpoints


def test_queue_wraps_around_when_the_size_is_not_a_multiple_of_the_batch() -> None:
    queue = KeyQueue(dim=2, size=5)
    a = torch.arange(6.0).reshape(3, 2)
    b = 10 + torch.arange(6.0).reshape(3, 2)
    queue.enqueue(a)
    assert int(queue.ptr) == 3
    torch.testing.assert_close(queue.keys[:3], a)
    queue.enqueue(b)  # slots 3, 4, then 0
    assert int(queue.ptr) == 1
    torch.testing.assert_close(queue.keys, torch.stack([b[2], a[1], a[2], b[0], b[1]]))


def test_more_keys_than_slots_keep_the_newest_as_one_by_one_would() -> None:
    keys = torch.arange(14.0).reshape(7, 2)
    at_once, one_by_one = KeyQueue(dim=2, size=5), KeyQueue(dim=2, size=5)
    one_by_one.load_state_dict(at_once.state_dict())
    at_once.enqueue(keys[:1])
    one_by_one.enqueue(keys[:1])
    at_once.enqueue(keys)  # 7 keys, pointer at 1: the last 5 survive
    for key in keys:
        one_by_one.enqueue(key[None])
    torch.testing.assert_close(at_once.keys, one_by_one.keys)
    assert int(at_once.ptr) == int(one_by_one.ptr) == (1 + 7) % 5
    # The newest key sits just before the pointer.
    torch.testing.assert_close(at_once.keys[(int(at_once.ptr) - 1) % 5], keys[-1])
    with pytest.raises(ValueError, match="enqueue expects"):
        at_once.enqueue(torch.zeros(2, 3))


GATHER_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from densedino.losses import KeyQueue

dist.init_process_group("gloo")
rank = dist.get_rank()
queue = KeyQueue(dim=2, size=4)
queue.keys.zero_()  # the same known start on both ranks
# Rank 0 holds 2 keys, rank 1 holds 3 (a last, smaller batch): 5 keys for 4 slots.
keys = torch.tensor([[10.0 * rank + i, rank] for i in range(rank + 2)])
queue.enqueue(keys)
after_first = queue.keys.tolist()
queue.enqueue(torch.tensor([[100.0 + rank, 0.0]]))
out = {"first": after_first, "second": queue.keys.tolist(), "ptr": int(queue.ptr)}
with open(sys.argv[1] + f".{rank}.json", "w") as f:
    json.dump(out, f)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_queue_holds_the_keys_of_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run(*cmd, script, tmp_path / "out", timeout=300)
    ranks = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank holds the same queue
    # Rank order: (0, 0) (1, 0) | (10, 1) (11, 1) (12, 1); the oldest key (0, 0) drops out and
    # the newest 4 fill slots 1, 2, 3, 0 (pointer 0 + 5 keys -> 1).
    assert ranks[0]["first"] == [[12, 1], [1, 0], [10, 1], [11, 1]]
    # Then one key per rank at slots 1 and 2.
    assert ranks[0]["second"] == [[12, 1], [100, 0], [101, 0], [11, 1]]
    assert ranks[0]["ptr"] == 3


# ---------------------------------------------------------------------------- correspondence
def test_correspondence_is_the_argmax_of_backbone_cosine() -> None:
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]])
    # Key 0 is long and nearly parallel to query 0 (it wins by dot product); key 1 is short and
    # exactly parallel (it wins by cosine).
    key = torch.tensor([[[10.0, 1.0], [0.1, 0.0], [0.2, 1.0], [-1.0, -2.0]]])
    assert dense_correspondence(query, key).tolist() == [[1, 2, 3]]
    assert (query[0] @ key[0].t()).argmax(1).tolist()[0] == 0
    # Batch elements are matched independently, and the key grid may differ in size.
    both = dense_correspondence(torch.cat([query, query]), torch.cat([key, key.flip(1)]))
    assert both.tolist() == [[1, 2, 3], [2, 1, 0]]
    # Against keys 0 and 1 only: query 1 has cos 0.0995 with key 0 and 0 with key 1; query 2
    # has cos -0.774 with key 0 and -0.707 with key 1.
    assert dense_correspondence(query, key[:, :2]).tolist() == [[1, 0, 1]]


# ------------------------------------------------------------------------------------ method
def test_losses_equal_a_per_location_computation(batch: dict) -> None:
    torch.manual_seed(0)
    method = DenseCL(**TINY_DENSECL)
    queue, dense_queue = method.queue.keys.clone(), method.dense_queue.keys.clone()
    out = method.compute_losses(batch, StepState())
    with torch.no_grad():
        q = method.encode(method.student, batch["views"][0])
        k = method.encode(method.teacher, batch["views"][1])  # the teacher is the student's copy
    temp = 0.2

    def nce(query: torch.Tensor, pos: torch.Tensor, negs: torch.Tensor) -> float:
        logits = torch.cat([(query @ pos)[None], negs @ query]) / temp
        return -torch.log_softmax(logits, dim=0)[0].item()

    glob = [nce(q["global"][b], k["global"][b], queue) for b in range(3)]
    dense = []
    for b in range(3):
        for i in range(q["tokens"].shape[1]):
            sims = F.cosine_similarity(q["tokens"][b, i][None], k["tokens"][b], dim=1)
            j = int(sims.argmax())
            dense.append(nce(q["dense"][b, i], k["dense"][b, j], dense_queue))
    assert len(dense) == 3 * 16
    assert out["loss_global"].item() == pytest.approx(sum(glob) / 3, rel=1e-5)
    assert out["loss_dense"].item() == pytest.approx(sum(dense) / len(dense), rel=1e-5)
    expected = 0.5 * out["loss_global"] + 0.5 * out["loss_dense"]
    torch.testing.assert_close(out["loss"].detach(), expected)

    # The queues got this batch's keys: global projections, and per image the normalised mean
    # of the dense projections (not single locations).
    assert int(method.queue.ptr) == int(method.dense_queue.ptr) == 3
    torch.testing.assert_close(method.queue.keys[:3], k["global"])
    with torch.no_grad():
        tokens = method.teacher.backbone.forward_features(batch["views"][1])["patch"]
        raw = method.teacher.neck.dense_proj(tokens.flatten(1, 2)).mean(1)
    torch.testing.assert_close(method.dense_queue.keys[:3], F.normalize(raw, dim=-1))
    torch.testing.assert_close(method.queue.keys[3:], queue[3:])
    out["loss"].backward()  # the queue copies keep backward valid after the in-place enqueue


def test_lambda_warm_up_and_global_feature(batch: dict, monkeypatch) -> None:
    torch.manual_seed(0)
    method = DenseCL(**TINY_DENSECL, loss_lambda=0.3, dense_warmup_iters=5)
    early = method.compute_losses(batch, StepState(iteration=4))
    torch.testing.assert_close(early["loss"].detach(), early["loss_global"])
    late = method.compute_losses(batch, StepState(iteration=5))
    expected = 0.7 * late["loss_global"] + 0.3 * late["loss_dense"]
    torch.testing.assert_close(late["loss"].detach(), expected)

    pooled = []
    mean_method = DenseCL(**TINY_DENSECL, global_feature="mean")
    neck = type(mean_method.student.neck)
    original = neck.forward

    def spy(self, pooled_feature, tokens):
        pooled.append((pooled_feature, tokens))
        return original(self, pooled_feature, tokens)

    monkeypatch.setattr(neck, "forward", spy)
    mean_method.encode(mean_method.student, batch["views"][0])
    torch.testing.assert_close(pooled[0][0], pooled[0][1].mean(1))
    with pytest.raises(ValueError, match="global_feature"):
        DenseCL(**TINY_DENSECL, global_feature="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 views"):
        method.compute_losses({"views": batch["views"][:1]}, StepState())


def test_key_encoder_is_an_ema_and_the_query_encoder_is_exported(batch: dict) -> None:
    torch.manual_seed(0)
    method = DenseCL(**TINY_DENSECL)
    assert method.export_backbone() is method.student.backbone
    out = method.compute_losses(batch, StepState())
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert method.student.neck.dense_proj[0].weight.grad is not None
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.update_teacher(0.999)
    student = method.student.state_dict()
    for name, param in method.teacher.named_parameters():  # backbone and neck
        torch.testing.assert_close(param, 0.999 * before[name] + 0.001 * student[name])


# --------------------------------------------------------------------------------------- CLI
# The demo config scaled down (tests/cli_runs.py), with queues of 64 keys (the 80 training
# images hold fewer than the demo's 1,024).
RUN_CONFIG = small_run_config("densecl_vit-t_demo.py", "queue_len=64, ")
EPOCHS = 16  # 80 training images / 16 = 5 iterations per epoch: 80 iterations
QUEUE_FULL = 4  # iterations until real keys have replaced the random initial ones (64 / 16)


@pytest.mark.slow
def test_cli_trains_exports_and_evaluates(tmp_path: Path) -> None:
    from densedino.data import write_demo_dataset
    from densedino.weights import load_backbone

    data = write_demo_dataset(tmp_path / "demo", num_images=100, image_size=64, workers=1)
    config = tmp_path / "densecl.py"
    config.write_text(RUN_CONFIG)
    work = tmp_path / "run"
    output = run(
        sys.executable, "-m", "densedino.cli.train", config, "--work-dir", work,
        "--cfg-options", f"train_cfg.max_epochs={EPOCHS}",
        f"train_dataloader.dataset.root={data.imagenet_train}",
    )  # fmt: skip

    # While random initial negatives are in the queue the task is easy; the loss rises as real
    # keys replace them (MoCo's usual start), then falls. Compared from the full queue on.
    loss = logged(work, "loss")
    assert len(loss) == EPOCHS * 5
    full = loss[QUEUE_FULL:]
    print(f"DenseCL loss {mean(loss[:QUEUE_FULL]):.3f} (random queue), then "
          f"{mean(full[:20]):.3f} -> {mean(full[-20:]):.3f}")  # fmt: skip
    assert mean(full[-20:]) < mean(full[:20]) - 0.2
    dense = logged(work, "loss_dense")[QUEUE_FULL:]
    assert mean(dense[-20:]) < mean(dense[:20]) - 0.1
    # No collapse: the monitor flagged nothing and the keys stay spread on the sphere.
    assert "0 iterations flagged as collapsed" in output
    assert min(logged(work, "feature_std")) > 0.2
    assert min(logged(work, "dense_feature_std")) > 0.2

    # The exported backbone is the query encoder; it loads and goes through k-NN and the probe.
    export = work / "export" / "backbone.safetensors"
    assert json.loads((work / "export" / "backbone.json").read_text())["method"] == "DenseCL"
    backbone = load_backbone(export)
    query_encoder = load_backbone(work / "epoch_16.pth", which="student")
    for name, value in query_encoder.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[name], value)
    assert_export_evaluates(export, data, tmp_path)

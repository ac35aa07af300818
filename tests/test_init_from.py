"""``model.init_from``: DenseDINO (and DINO) fine-tuned from DINO's, the authors' and our
checkpoints: which weights land where, what stays fresh, and the errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_layouts import (
    authors_args,
    dino_training_checkpoint,
    head_state,
    to_authors_backbone,
)
from tiny import TINY_DINO
from torch import nn

from densedino.methods import DINO, DenseDINO
from densedino.train.init_from import init_from_checkpoint, parse_init_from

SMALL = dict(TINY_DINO, patch_size=16)


def dense_dino(**kw: object) -> DenseDINO:
    torch.manual_seed(0)
    return DenseDINO(**{**SMALL, **kw})  # type: ignore[arg-type]


def backbone_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return DINO(**SMALL).student.backbone.state_dict()  # type: ignore[arg-type]


def assert_state(module: nn.Module | dict, state: dict[str, torch.Tensor]) -> None:
    """Exactly the given tensors (a module's state dict, or a dict)."""
    own = module.state_dict() if isinstance(module, nn.Module) else module
    assert own.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(own[key], value, atol=0, rtol=0, msg=key)


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert_state(module, before)


@pytest.fixture
def dino_file(tmp_path: Path) -> tuple[Path, dict]:
    """A main_dino.py checkpoint whose student and teacher (backbones and heads) all differ."""
    parts = {
        "student": backbone_state(1),
        "teacher": backbone_state(2),
        "student_head": head_state(192, 3),
        "teacher_head": head_state(192, 4),
    }
    checkpoint = dino_training_checkpoint(
        parts["student"],
        parts["teacher"],
        {"head": parts["student_head"]},
        {"head": parts["teacher_head"]},
    )
    path = tmp_path / "dino_checkpoint.pth"
    torch.save(checkpoint, path)
    return path, parts


def test_dino_checkpoint_initialises_backbones_cls_and_reference_heads(dino_file):
    path, parts = dino_file
    method = dense_dino()
    report = init_from_checkpoint(method, path)
    assert_state(method.student.backbone, parts["student"])
    assert_state(method.teacher.backbone, parts["teacher"])
    # The CLS head from DINO's head, the reference head from the same head (the paper's recipe).
    assert_state(method.student.head, parts["student_head"])
    assert_state(method.student.ref_head, parts["student_head"])
    assert_state(method.teacher.head, parts["teacher_head"])
    assert_state(method.teacher.ref_head, parts["teacher_head"])
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert report.loaded["student"] == [
        "backbone <- the file's student",
        "head <- the file's student head",
        "ref_head <- the file's student head",
    ]
    assert report.fresh == {"student": [], "teacher": []}
    text = "\n".join(report.lines())
    assert "teacher: loaded backbone <- the file's teacher" in text
    assert "loss centers: fresh" in text


def test_which_takes_both_networks_from_one_entry(dino_file):
    path, parts = dino_file
    method = dense_dino()
    init_from_checkpoint(method, path, which="teacher")
    assert_state(method.student.backbone, parts["teacher"])
    assert_state(method.student.ref_head, parts["teacher_head"])
    assert_state(method.teacher.backbone, parts["teacher"])


def test_bare_backbone_leaves_heads_and_learnable_content_fresh(tmp_path):
    method = dense_dino(ref_content="learnable")
    heads = {n: {k: v.clone() for k, v in getattr(method.student, n).state_dict().items()}
             for n in ("head", "ref_head")}  # fmt: skip
    ref_token = method.student.backbone.ref_token.detach().clone()
    state = backbone_state(5)  # DINO's released backbone-only file: a bare state dict
    torch.save(state, tmp_path / "dino_backbone.pth")
    report = init_from_checkpoint(method, tmp_path / "dino_backbone.pth")
    for network in (method.student, method.teacher):
        loaded = {k: v for k, v in network.backbone.state_dict().items() if k != "ref_token"}
        assert_state(loaded, state)
    assert_unchanged(method.student.head, heads["head"])
    assert_unchanged(method.student.ref_head, heads["ref_head"])
    torch.testing.assert_close(method.student.backbone.ref_token, ref_token, atol=0, rtol=0)
    assert report.loaded["student"] == ["backbone <- the file"]
    assert report.fresh["teacher"] == [
        "backbone.ref_token (the file has no learnable reference content)",
        "head",
        "ref_head",
    ]


def test_authors_checkpoint_gives_the_reference_head_its_own(tmp_path):
    student, teacher = backbone_state(1), backbone_state(2)
    student["ref_token"] = torch.randn(1, 1, 192)
    teacher["ref_token"] = torch.randn(1, 1, 192)
    heads = {"head": head_state(192, 3), "ref_head": head_state(192, 4)}
    checkpoint = dino_training_checkpoint(
        to_authors_backbone(student), to_authors_backbone(teacher), heads, heads, authors_args()
    )
    torch.save(checkpoint, tmp_path / "authors.pth")
    method = dense_dino(ref_content="learnable")
    init_from_checkpoint(method, tmp_path / "authors.pth")
    assert_state(method.student.backbone, student)
    assert_state(method.teacher.backbone, teacher)
    assert_state(method.student.ref_head, heads["ref_head"])
    assert_state(method.teacher.head, heads["head"])


def test_our_training_checkpoint_initialises_dense_dino_from_dino(tmp_path):
    torch.manual_seed(9)
    dino = DINO(**SMALL)  # type: ignore[arg-type]
    with torch.no_grad():
        for param in dino.teacher.parameters():
            param.add_(0.1)
    state = {f"method.{k}": v for k, v in dino.state_dict().items()}  # SSLModel's keys
    torch.save({"meta": {"epoch": 6}, "state_dict": state}, tmp_path / "epoch_6.pth")
    method = dense_dino()
    init_from_checkpoint(method, tmp_path / "epoch_6.pth")
    assert_state(method.student.backbone, dino.student.backbone.state_dict())
    assert_state(method.teacher.backbone, dino.teacher.backbone.state_dict())
    assert_state(method.student.ref_head, dino.student.head.state_dict())
    assert_state(method.teacher.ref_head, dino.teacher.head.state_dict())


def test_position_grid_of_another_size_is_resampled(tmp_path):
    torch.manual_seed(4)
    big = DINO(**{**SMALL, "backbone": dict(img_size=64, depth=2)})  # type: ignore[arg-type]
    torch.save(big.teacher.backbone.state_dict(), tmp_path / "vit_64px.pth")
    method = dense_dino()
    report = init_from_checkpoint(method, tmp_path / "vit_64px.pth")
    assert "position grid resampled" in report.loaded["student"][0]
    assert method.student.backbone.pos_embed.shape == (1, 1 + 2 * 2, 192)
    torch.testing.assert_close(method.student.backbone.blocks[1].mlp.fc2.weight,
                               big.teacher.backbone.blocks[1].mlp.fc2.weight)  # fmt: skip


def test_mismatched_head_and_bad_options_are_clear(dino_file):
    path, _ = dino_file
    with pytest.raises(ValueError, match=r"out_dim 64.*out_dim 128.*out_dim"):
        init_from_checkpoint(dense_dino(out_dim=128), path)
    with pytest.raises(ValueError, match="which"):
        init_from_checkpoint(dense_dino(), path, which="ema")
    with pytest.raises(ValueError, match="init_from must be"):
        parse_init_from({"file": str(path)})
    assert parse_init_from(str(path)) == (str(path), "both")
    assert parse_init_from({"path": path, "which": "student"}) == (str(path), "student")
    with pytest.raises(FileNotFoundError):
        init_from_checkpoint(dense_dino(), path.with_name("missing.pth"))


def test_ssl_model_config_option(dino_file):
    from mmengine.registry import MODELS

    import densedino.train  # noqa: F401  (registers SSLModel)

    path, parts = dino_file
    method = dict(type="DenseDINO", **SMALL)
    model = MODELS.build(dict(type="SSLModel", method=method, init_from=str(path)))
    assert_state(model.method.student.backbone, parts["student"])
    assert_state(model.method.teacher.ref_head, parts["teacher_head"])
    other = MODELS.build(
        dict(type="SSLModel", method=method, init_from=dict(path=str(path), which="teacher"))
    )
    assert_state(other.method.student.backbone, parts["teacher"])


def test_finetune_config():
    from mmengine.config import Config

    root = Path(__file__).resolve().parents[1]
    cfg = Config.fromfile(root / "configs/densedino/densedino_vit-s16_finetune_dino.py")
    assert cfg.model.type == "SSLModel" and cfg.model.init_from.endswith(".pth")
    method = cfg.model.method
    assert (method.type, method.arch, method.patch_size, method.out_dim) == (
        "DenseDINO",
        "vit_small",
        16,
        65536,
    )
    assert cfg.train_dataloader.dataset.views.preset == "paper"

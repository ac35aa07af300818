"""Checkpoint files as DINO's ``main_dino.py`` and the DenseDINO authors' code write them, built by
key layout from our own modules (no third-party code): the tests of ``load_backbone``, the CLIs
and ``init_from`` read them (imported by file name, like ``cli_runs``)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
from torch import Tensor

from densedino.models.heads import DINOHead


def dino_args(**overrides: object) -> argparse.Namespace:
    """``args`` as ``main_dino.py`` pickles it: an argparse.Namespace of plain values."""
    values: dict[str, object] = dict(
        arch="vit_small",
        patch_size=16,
        out_dim=65536,
        norm_last_layer=False,
        momentum_teacher=0.996,
        use_bn_in_head=False,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        use_fp16=True,
        weight_decay=0.04,
        clip_grad=0.0,
        batch_size_per_gpu=64,
        epochs=800,
        lr=0.0005,
        optimizer="adamw",
        drop_path_rate=0.1,
        global_crops_scale=(0.25, 1.0),
        local_crops_number=10,
        local_crops_scale=[0.05, 0.25],
        data_path="/path/to/imagenet/train",
        output_dir=".",
        seed=0,
        dist_url="env://",
        local_rank=0,
        rank=0,
        world_size=16,
        gpu=0,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def authors_args(**overrides: object) -> argparse.Namespace:
    """The DenseDINO authors' README flags on top of DINO's."""
    values: dict[str, object] = dict(
        arch="vit_tiny",
        given_pos=True,
        with_learnable_token=True,
        remove_global_token=False,
        num_reference=2,
        sampling_mode="random",
        mask_mode="all2pos_pos2cls_eye",
        use_global_loss=True,
        use_ref_loss=True,
        use_all_crop_ref=True,
        alpha=0.5,
        pretrained_weights="",
        finetune=False,
    )
    values.update(overrides)
    return dino_args(**values)


def head_state(in_dim: int, seed: int, out_dim: int = 64) -> dict[str, Tensor]:
    """A DINO head's state dict (``mlp.*``, ``last_layer.weight_g/_v``) with random values."""
    torch.manual_seed(seed)
    head = DINOHead(in_dim, out_dim, hidden_dim=32, bottleneck_dim=16)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 1.5)  # not the init's ones
    return head.state_dict()


def optimizer_state(params: list[Tensor]) -> dict:
    """A real AdamW state dict after one step (tensors, lists, floats, bools, None)."""
    weights = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(weights, lr=5e-4)
    for w in weights:
        w.grad = torch.ones_like(w)
    opt.step()
    return opt.state_dict()


FP16_SCALER = {  # torch.cuda.amp.GradScaler().state_dict() as DINO saves it
    "scale": 65536.0,
    "growth_factor": 2.0,
    "backoff_factor": 0.5,
    "growth_interval": 2000,
    "_growth_tracker": 7,
}


def to_authors_backbone(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our backbone keys in the authors' layout: ``pos_embed`` split into ``cls_pos_embed`` and
    ``patch_pos_embed``, ``ref_token`` named ``ref_learn_token``."""
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            out["cls_pos_embed"] = value[:, :1].clone()
            out["patch_pos_embed"] = value[:, 1:].clone()
        elif key == "ref_token":
            out["ref_learn_token"] = value.clone()
        else:
            out[key] = value.clone()
    return out


def network(
    backbone: Mapping[str, Tensor], heads: Mapping[str, Mapping[str, Tensor]], ddp: bool
) -> dict[str, Tensor]:
    """A MultiCropWrapper state dict (``backbone.``, ``head.``, ``ref_head.``), DDP-prefixed."""
    prefix = "module." if ddp else ""
    out = {f"{prefix}backbone.{k}": v for k, v in backbone.items()}
    for name, state in heads.items():
        out.update({f"{prefix}{name}.{k}": v for k, v in state.items()})
    return out


def dino_training_checkpoint(
    student: Mapping[str, Tensor],
    teacher: Mapping[str, Tensor],
    student_heads: Mapping[str, Mapping[str, Tensor]],
    teacher_heads: Mapping[str, Mapping[str, Tensor]],
    args: argparse.Namespace | None = None,
) -> dict:
    """``save_dict`` of ``main_dino.py`` (the authors' is the same with a ``ref_head``): the
    student behind DDP (``module.``), the teacher not."""
    out_dim = (
        next(iter(teacher_heads.values()))["last_layer.weight_v"].shape[0] if teacher_heads else 8
    )
    return {
        "student": network(student, student_heads, ddp=True),
        "teacher": network(teacher, teacher_heads, ddp=False),
        "optimizer": optimizer_state(list(student.values())[:3]),
        "epoch": 100,
        "args": args if args is not None else dino_args(),
        "dino_loss": {"center": torch.randn(1, out_dim)},
        "fp16_scaler": dict(FP16_SCALER),
    }

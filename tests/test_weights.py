"""Weights I/O: timm / DINO / mmengine checkpoints, safe unpickling, safetensors export."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors
import safetensors.torch
import timm
import torch

from densedino.models.vit import VisionTransformer
from densedino.weights import load_backbone, save_backbone

ATOL = 1e-5
CODE_RAN: list[str] = []


def _mark_code_ran() -> None:
    CODE_RAN.append("unpickled code ran")


class PickledArgs:
    """Stands for argparse.Namespace & co. in a DINO checkpoint: unpickling it runs code."""

    def __reduce__(self):
        return (_mark_code_ran, ())


@pytest.fixture(scope="module")
def timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True)
    return model.eval()


def tiny_vit(img_size: int = 64, **kw: object) -> VisionTransformer:
    torch.manual_seed(3)
    return VisionTransformer(img_size=img_size, embed_dim=192, depth=2, num_heads=3, **kw).eval()  # type: ignore[arg-type]


def assert_matches_timm(
    model: VisionTransformer, timm_vit: torch.nn.Module, size: tuple[int, int]
) -> None:
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = timm_vit.forward_features(x)
        ours = model.forward_features(x)
    grid = (size[0] // 16, size[1] // 16)
    torch.testing.assert_close(ours["cls"], ref[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["patch"], ref[:, 1:].reshape(1, *grid, -1), atol=ATOL, rtol=0)


def test_timm_state_dict_gives_timm_features(timm_vit):
    model = load_backbone(timm_vit.state_dict(), pos_interp="timm")
    assert not model.training
    assert (model.embed_dim, model.num_heads, model.depth, model.patch_size) == (384, 6, 12, 16)
    for size in [(224, 224), (224, 320), (96, 96), (160, 160), (288, 288), (448, 448)]:
        assert_matches_timm(model, timm_vit, size)


def test_dino_interpolation_is_the_default_and_differs_from_timm_off_the_native_size(timm_vit):
    model = load_backbone(timm_vit.state_dict())
    assert model.pos_interp == "dino"
    assert_matches_timm(model, timm_vit, (224, 224))  # the native grid: no interpolation
    with pytest.raises(AssertionError):
        assert_matches_timm(model, timm_vit, (96, 96))


def test_dino_training_checkpoint(timm_vit, tmp_path):
    teacher = {k: v for k, v in timm_vit.state_dict().items() if not k.startswith("head.")}
    student = {k: v.clone() for k, v in teacher.items()}
    student["cls_token"] = student["cls_token"] + 1.0
    checkpoint = {
        "teacher": {
            **{"backbone." + k: v for k, v in teacher.items()},
            "head.mlp.0.weight": torch.zeros(2048, 384),
            "head.last_layer.weight_g": torch.ones(65536, 1)[:8],
        },
        "student": {
            **{"module.backbone." + k: v for k, v in student.items()},
            "module.head.mlp.0.weight": torch.zeros(2048, 384),
        },
        "epoch": 3,
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    model = load_backbone(path)
    assert_matches_timm(model, timm_vit, (224, 224))
    picked = load_backbone(str(path), "vit_small", which="student")
    torch.testing.assert_close(picked.cls_token, student["cls_token"])


def test_mmengine_checkpoint_with_message_hub(tmp_path):
    from mmengine.logging import MessageHub

    source = tiny_vit(img_size=224)  # checkpoints without metadata load at 224 px
    hub = MessageHub.get_instance("test_weights")
    hub.update_scalar("train/loss", 1.5)
    hub.update_scalar("train/lr", np.float64(1e-4))
    hub.update_info("epoch", np.int64(2))
    state = source.state_dict()
    checkpoint = {
        "meta": {"epoch": 2, "iter": 10, "seed": np.int64(0)},
        "state_dict": {
            **{f"teacher.backbone.{k}": v for k, v in state.items()},
            **{f"module.student.backbone.{k}": v + 1 for k, v in state.items()},
            "teacher.head.mlp.0.weight": torch.zeros(4, 4),
        },
        "message_hub": hub.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
    }
    path = tmp_path / "epoch_2.pth"
    torch.save(checkpoint, path)
    teacher = load_backbone(path)
    student = load_backbone(path, which="student")
    torch.testing.assert_close(teacher.pos_embed, source.pos_embed)
    torch.testing.assert_close(student.pos_embed, source.pos_embed + 1)
    with pytest.raises(ValueError, match="which"):
        load_backbone(path, which="ema")


def test_pickled_code_is_refused(timm_vit, tmp_path):
    state = {"backbone." + k: v for k, v in timm_vit.state_dict().items()}
    path = tmp_path / "dino_with_args.pth"
    torch.save({"teacher": state, "args": PickledArgs(), "epoch": 1}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_backbone(path)
    assert CODE_RAN == []


def test_getattr_is_restricted_to_history_buffer_statistics(tmp_path):
    from mmengine.logging.history_buffer import HistoryBuffer

    class SneakyGetattr:
        def __reduce__(self):
            return (getattr, (HistoryBuffer, "__init__"))

    path = tmp_path / "sneaky.pth"
    torch.save({"state_dict": {}, "x": SneakyGetattr()}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_backbone(path)


def test_safetensors_round_trip_and_timm_loads_it(timm_vit, tmp_path):
    model = load_backbone(timm_vit.state_dict())
    path = save_backbone(model, tmp_path / "vit_small.safetensors", metadata={"epoch": 3})
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "vit_small" and meta["patch_size"] == "16" and meta["epoch"] == "3"
    assert (meta["embed_dim"], meta["depth"], meta["num_heads"]) == ("384", "12", "6")
    again = load_backbone(path, "vit_small")
    assert not again.training
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    fresh = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    fresh.load_state_dict(safetensors.torch.load_file(path))  # strict
    assert torch.equal(fresh.pos_embed, timm_vit.pos_embed)


def test_safetensors_keeps_reference_options(tmp_path):
    model = tiny_vit(ref_content="learnable", ref_padding="border")
    path = save_backbone(model, tmp_path / "tiny.safetensors")
    again = load_backbone(path)
    assert (again.ref_content, again.ref_padding, again.img_size) == ("learnable", "border", 64)
    torch.testing.assert_close(again.ref_token, model.ref_token)
    with pytest.raises(ValueError, match="reserved"):
        save_backbone(model, tmp_path / "bad.safetensors", metadata={"depth": 12})


def test_arch_mismatch_and_bad_checkpoints(timm_vit, tmp_path):
    state = timm_vit.state_dict()
    with pytest.raises(ValueError, match=r"arch mismatch.*384.*vit_small"):
        load_backbone(state, "vit_tiny")
    with pytest.raises(ValueError, match="unknown arch"):
        load_backbone(state, "vit_giant")
    broken = {k: v for k, v in state.items() if not k.startswith("blocks.3.mlp")}
    with pytest.raises(ValueError, match=r"missing keys.*blocks\.3\.mlp"):
        load_backbone(broken)
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        load_backbone({"epoch": 3, "args": "x"})
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "nope.pth")


def test_position_grid_of_another_size_is_kept():
    torch.manual_seed(1)
    timm_384 = timm.create_model(
        "vit_small_patch16_384", pretrained=False, depth=2, dynamic_img_size=True
    ).eval()
    model = load_backbone(timm_384.state_dict(), pos_interp="timm")
    # The learned 24 x 24 grid is kept as is (img_size inferred) and resampled per input size,
    # exactly as timm does.
    assert model.pos_embed.shape == (1, 1 + 24 * 24, 384) and model.img_size == 384
    assert_matches_timm(model, timm_384, (384, 384))
    assert_matches_timm(model, timm_384, (224, 224))

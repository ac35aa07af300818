"""Weights I/O: timm / DINO / mmengine checkpoints, safe unpickling, safetensors export."""

from __future__ import annotations

import copy
import zipfile

import numpy as np
import pytest
import safetensors
import safetensors.torch
import timm
import torch
from checkpoint_layouts import (
    authors_args,
    dino_args,
    dino_training_checkpoint,
    head_state,
    network,
    to_authors_backbone,
)

from densedino.models.vit import VisionTransformer
from densedino.weights import extract_head_states, load_backbone, save_backbone

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


# ------------------------------------------------- DINO main_dino.py and the authors' checkpoints
def perturbed(model: VisionTransformer, seed: int) -> VisionTransformer:
    """A copy of ``model`` with every tensor moved by noise (a distinct student)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return other


def assert_same_features(model: VisionTransformer, source: VisionTransformer) -> None:
    """CLS, patch and reference outputs equal at the native size and at a non-square one."""
    generator = torch.Generator().manual_seed(7)
    for size in ((64, 64), (96, 64)):
        images = torch.randn(2, 3, *size, generator=generator)
        points = torch.rand(2, 3, 2, generator=generator) * 2 - 1
        with torch.no_grad():
            got = model.forward_features(images, points)
            want = source.forward_features(images, points)
        for key in ("cls", "patch", "ref"):
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0)


def test_dino_main_dino_checkpoint_with_args_optimizer_and_scaler(tmp_path):
    teacher = tiny_vit()
    student = perturbed(teacher, 1)
    checkpoint = dino_training_checkpoint(
        student.state_dict(),
        teacher.state_dict(),
        {"head": head_state(192, 1)},
        {"head": head_state(192, 2)},
    )
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    # What the file holds besides tensors: DINO's args as an argparse.Namespace.
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"argparse" in pickled and b"Namespace" in pickled
    assert_same_features(load_backbone(path), teacher)
    assert_same_features(load_backbone(path, which="student"), student)
    assert load_backbone(path).img_size == 64  # the stored 4 x 4 grid of 16 px patches


def test_code_inside_dino_args_is_refused(tmp_path):
    state = tiny_vit().state_dict()
    checkpoint = dino_training_checkpoint(state, state, {}, {}, args=dino_args(hook=PickledArgs()))
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_backbone(path)
    assert CODE_RAN == []


@pytest.mark.parametrize("learnable", [True, False])
@pytest.mark.parametrize("layout", ["training", "wrapper", "bare"])
def test_authors_checkpoint_gives_the_source_features(tmp_path, learnable, layout):
    teacher = tiny_vit(ref_content="learnable" if learnable else "zero")
    student = perturbed(teacher, 2)
    authors_t = to_authors_backbone(teacher.state_dict())
    assert ("ref_learn_token" in authors_t) == learnable and "pos_embed" not in authors_t
    heads = {"head": head_state(192, 1), "ref_head": head_state(192, 2)}
    if layout == "training":  # main_dino.py's save_dict of the authors' fork
        checkpoint = dino_training_checkpoint(
            to_authors_backbone(student.state_dict()),
            authors_t,
            heads,
            heads,
            args=authors_args(with_learnable_token=learnable),
        )
    elif layout == "wrapper":  # a MultiCropWrapper state dict: backbone, head, ref_head
        checkpoint = network(authors_t, heads, ddp=False)
    else:  # the backbone alone, with their ViT's (empty here) classifier slot
        checkpoint = authors_t
    path = tmp_path / "authors.pth"
    torch.save(checkpoint, path)
    model = load_backbone(path)
    assert model.ref_content == ("learnable" if learnable else "zero")
    assert_same_features(model, teacher)
    if layout == "training":
        assert_same_features(load_backbone(path, which="student"), student)


def test_authors_checkpoint_without_cls_token_is_refused():
    state = to_authors_backbone(tiny_vit().state_dict())
    del state["cls_token"], state["cls_pos_embed"]  # --remove_global_token
    with pytest.raises(ValueError, match="remove_global_token"):
        load_backbone(state)


def test_heads_of_dino_and_authors_checkpoints(timm_vit):
    state = tiny_vit().state_dict()
    dino = dino_training_checkpoint(
        state, state, {"head": head_state(192, 1)}, {"head": head_state(192, 2)}
    )
    heads = extract_head_states(dino)
    assert sorted(heads) == ["head"]
    torch.testing.assert_close(heads["head"]["last_layer.weight_v"],
                               head_state(192, 2)["last_layer.weight_v"])  # fmt: skip
    student = extract_head_states(dino, which="student")
    torch.testing.assert_close(student["head"]["mlp.0.weight"], head_state(192, 1)["mlp.0.weight"])
    both = {"head": head_state(192, 1), "ref_head": head_state(192, 3)}
    authors = network(to_authors_backbone(state), both, ddp=True)
    assert sorted(extract_head_states(authors)) == ["head", "ref_head"]
    # A timm classifier 'head.weight' is no DINO head; a bare backbone has none.
    classifier = timm.create_model("vit_tiny_patch16_224", depth=1).state_dict()
    assert "head.weight" in classifier and extract_head_states(classifier) == {}
    assert extract_head_states(state) == {}

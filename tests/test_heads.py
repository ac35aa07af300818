"""Tests for densedino.models.heads (DINO projection head)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densedino.models.heads import DINOHead, WeightNormLinear, cancel_last_layer_gradients

DINO_KEYS = {
    "mlp.0.weight",
    "mlp.0.bias",
    "mlp.2.weight",
    "mlp.2.bias",
    "mlp.4.weight",
    "mlp.4.bias",
    "last_layer.weight_g",
    "last_layer.weight_v",
}


def small_head(**kwargs) -> DINOHead:
    args = {"in_dim": 8, "out_dim": 10, "hidden_dim": 16, "bottleneck_dim": 6}
    args.update(kwargs)
    return DINOHead(**args)


def test_output_shapes_for_cls_and_reference_tokens() -> None:
    torch.manual_seed(0)
    head = small_head()
    assert head(torch.randn(3, 8)).shape == (3, 10)
    tokens = torch.randn(2, 5, 8)
    out = head(tokens)
    assert out.shape == (2, 5, 10)
    # Each token is projected independently of the others.
    torch.testing.assert_close(out[1, 3], head(tokens[1, 3:4])[0])


def test_bottleneck_is_l2_normalised() -> None:
    torch.manual_seed(0)
    head = small_head()
    seen: list[torch.Tensor] = []
    head.last_layer.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    head(10.0 * torch.randn(4, 3, 8))
    norms = seen[0].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_norm_last_layer_freezes_unit_weight_g() -> None:
    torch.manual_seed(0)
    head = small_head()
    g = head.last_layer.weight_g
    assert g.shape == (10, 1)
    assert not g.requires_grad
    torch.testing.assert_close(g, torch.ones_like(g))
    # With g = 1 every prototype (row of the effective weight) has unit norm.
    row_norms = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones_like(row_norms))
    head(torch.randn(4, 8)).sum().backward()
    assert g.grad is None
    assert head.last_layer.weight_v.grad is not None
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert "last_layer.weight_g" not in trainable


def test_norm_last_layer_false_trains_weight_g() -> None:
    torch.manual_seed(0)
    head = small_head(norm_last_layer=False)
    g = head.last_layer.weight_g
    assert g.requires_grad
    torch.testing.assert_close(g, torch.ones_like(g))
    head(torch.randn(4, 8)).pow(2).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


def test_state_dict_keys_match_dino() -> None:
    assert set(small_head().state_dict()) == DINO_KEYS
    bn_keys = set(small_head(use_bn=True).state_dict())
    # BatchNorm sits at index 1 and 4, shifting the linear layers to 0, 3, 6 (as in DINO).
    assert {"mlp.0.weight", "mlp.1.running_mean", "mlp.3.weight", "mlp.6.weight"} <= bn_keys
    assert set(small_head(nlayers=1).state_dict()) == {
        "mlp.weight",
        "mlp.bias",
        "last_layer.weight_g",
        "last_layer.weight_v",
    }


def test_loads_dino_checkpoint_and_computes_weight_norm() -> None:
    torch.manual_seed(0)
    shapes = {
        "mlp.0.weight": (16, 8),
        "mlp.0.bias": (16,),
        "mlp.2.weight": (16, 16),
        "mlp.2.bias": (16,),
        "mlp.4.weight": (6, 16),
        "mlp.4.bias": (6,),
        "last_layer.weight_v": (10, 6),
    }
    ckpt = {k: torch.randn(s) for k, s in shapes.items()}
    ckpt["last_layer.weight_g"] = torch.rand(10, 1) + 0.5  # a norm_last_layer=False head
    head = small_head()
    head.load_state_dict(ckpt, strict=True)
    for k, v in ckpt.items():
        torch.testing.assert_close(head.state_dict()[k], v)

    x = torch.randn(3, 8)
    h = F.gelu(x @ ckpt["mlp.0.weight"].T + ckpt["mlp.0.bias"])
    h = F.gelu(h @ ckpt["mlp.2.weight"].T + ckpt["mlp.2.bias"])
    z = h @ ckpt["mlp.4.weight"].T + ckpt["mlp.4.bias"]
    z = z / z.norm(dim=-1, keepdim=True)
    v = ckpt["last_layer.weight_v"]
    w = ckpt["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), z @ w.T)


def test_init_trunc_normal_and_zero_bias() -> None:
    torch.manual_seed(0)
    head = DINOHead(in_dim=64, out_dim=10, hidden_dim=256, bottleneck_dim=8)
    w = head.mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.002
    for name, p in head.mlp.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name


def test_cancel_last_layer_gradients() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"cls": small_head(norm_last_layer=False), "ref": small_head()})
    x = torch.randn(2, 8)
    (model["cls"](x).sum() + model["ref"](x).pow(2).sum()).backward()
    assert model["cls"].last_layer.weight_v.grad is not None
    assert cancel_last_layer_gradients(model) == 2
    for head in model.values():
        assert all(p.grad is None for p in head.last_layer.parameters())
        assert all(p.grad is not None for p in head.mlp.parameters())


def test_batchnorm_head_accepts_token_batches() -> None:
    torch.manual_seed(0)
    assert small_head(use_bn=True)(torch.randn(2, 3, 8)).shape == (2, 3, 10)


def test_errors() -> None:
    head = small_head()
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        head(torch.randn(2, 7))
    with pytest.raises(ValueError, match="nlayers"):
        small_head(nlayers=0)
    with pytest.raises(ValueError, match="out_dim"):
        small_head(out_dim=0)


@pytest.mark.parametrize("train_g", [False, True])
def test_weight_norm_linear_matches_materialised_weight(train_g: bool) -> None:
    """The output scaling equals DINO's formulation, x @ (g * v / ||v||).T, in the outputs and
    in the gradients of x, v and g."""
    torch.manual_seed(0)
    layer = WeightNormLinear(8, 12)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    layer.weight_g.requires_grad_(train_g)
    x = torch.randn(3, 5, 8, requires_grad=True)
    target = torch.randn(3, 5, 12)
    v = layer.weight_v.detach().clone().requires_grad_(True)
    g = layer.weight_g.detach().clone().requires_grad_(train_g)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = x_ref @ (g * v / v.norm(dim=1, keepdim=True)).T
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    (out * target).sum().backward()
    (expected * target).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.weight_v.grad, v.grad, rtol=1e-6, atol=1e-6)
    if train_g:
        torch.testing.assert_close(layer.weight_g.grad, g.grad, rtol=1e-6, atol=1e-6)
    else:
        assert layer.weight_g.grad is None


def test_weight_norm_linear_keeps_no_tensor_of_the_output_size_for_backward() -> None:
    """Only the loss should hold a [tokens, prototypes] tensor: the layer saves x, v and the
    scale (autograd's ``F.linear(x, v) * scale`` also saved the product)."""
    torch.manual_seed(0)
    layer = WeightNormLinear(8, 12)
    x = torch.randn(7, 8, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        layer(x).sum().backward()
    assert saved and all(shape.numel() != 7 * 12 for shape in saved), saved
    unscaled: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: unscaled.append(t.shape) or t, lambda t: t
    ):
        scale = (layer.weight_g / layer.weight_v.norm(dim=1, keepdim=True)).squeeze(1)
        (F.linear(x, layer.weight_v) * scale).sum()
    assert any(shape.numel() == 7 * 12 for shape in unscaled)  # the check above can fail


def test_weight_norm_linear_under_bf16_autocast_is_as_accurate_as_autograd() -> None:
    """Under CPU bf16 autocast the backward's products run in bf16, as autograd's would: the
    same outputs as ``F.linear(x, v) * scale``, and gradients no further from the float64
    values than autograd's bf16 gradients are."""
    torch.manual_seed(0)
    layer = WeightNormLinear(16, 32)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(4, 6, 16)
    target = torch.randn(4, 6, 32)

    def run(mode: str) -> tuple[torch.Tensor, ...]:
        net = WeightNormLinear(16, 32).double() if mode == "float64" else layer
        net.load_state_dict(layer.state_dict())
        net.zero_grad(set_to_none=True)
        x_in = x.clone().to(net.weight_v.dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "float64"):
            v, g = net.weight_v, net.weight_g
            if mode == "autograd":
                out = F.linear(x_in, v) * (g / v.norm(dim=1, keepdim=True)).squeeze(1)
            elif mode == "float64":  # DINO's materialised weight
                out = x_in @ (g * v / v.norm(dim=1, keepdim=True)).T
            else:
                out = net(x_in)
        (out.double() * target.double()).sum().backward()
        return out, x_in.grad, net.weight_v.grad, net.weight_g.grad

    ours, autograd, exact = run("ours"), run("autograd"), run("float64")
    assert ours[0].dtype == autograd[0].dtype
    torch.testing.assert_close(ours[0], autograd[0])
    for mine, theirs, truth in zip(ours[1:], autograd[1:], exact[1:], strict=True):
        error = (mine.double() - truth).abs().max()
        assert error <= 1.5 * (theirs.double() - truth).abs().max() + 1e-3, error

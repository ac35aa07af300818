"""Projection heads shared by the self-distillation methods.

`DINOHead` follows the head of facebookresearch/dino: an MLP to a small bottleneck, L2
normalisation, then a weight-normalised linear layer to the prototype scores. Its state-dict keys
are those of DINO's released checkpoints (``mlp.0.weight``, ..., ``last_layer.weight_g``,
``last_layer.weight_v``) so a DINO head loads unchanged (fine-tuning DenseDINO from a DINO
checkpoint loads it into both the CLS and the reference head, the paper's recipe).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead", "WeightNormLinear", "cancel_last_layer_gradients"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation: ``weight = g * v / ||v||`` per output row.

    Parameters are named ``weight_g`` [out_features, 1] and ``weight_v`` [out_features,
    in_features], as `torch.nn.utils.weight_norm(nn.Linear(...))` (dim=0) names them. The legacy
    helper is deprecated and the parametrization API renames the keys, so the few lines are
    written out here to keep DINO's checkpoint layout.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        weight = torch.empty(out_features, in_features)
        # Same initial direction as a fresh nn.Linear (which DINO wraps), g = ||v|| so that the
        # initial weight equals v; DINOHead then overwrites g with ones.
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.weight_v = nn.Parameter(weight)
        self.weight_g = nn.Parameter(weight.norm(dim=1, keepdim=True).clone())

    @property
    def weight(self) -> Tensor:
        """The effective weight [out_features, in_features]."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        """Map [..., in_features] to [..., out_features].

        Equal to ``F.linear(x, self.weight)``, computed as ``F.linear(x, v) * (g / ||v||)``:
        the effective weight (65536 x 256 in DINO's head) is never materialised, which saves
        two passes over it and its allocation in every forward and backward, while the scaled
        output has only one row per token.
        """
        scale = (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)).squeeze(1)
        return _ScaledLinear.apply(x, self.weight_v, scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _ScaledLinear(torch.autograd.Function):
    """``F.linear(x, v) * s`` for a per-output scale ``s`` [C], saving x, v and s only.

    Autograd would keep the [..., C] product ``x v^T`` for the gradient of ``s``, a second
    tensor of the size of the logits besides the one the loss keeps (for DenseDINO's reference
    tokens 48 MiB at the paper's setting). The gradient needs no such tensor:
    ``dL/ds_c = sum_n grad_nc (x_n . v_c) = v_c . G_c`` with ``G = grad^T x`` [C, in], which the
    gradient of v needs anyway (``dL/dv = G * s``). The products run in the dtype the forward's
    product ran in, so that under autocast the backward is bf16/fp16 as autograd's would be.
    """

    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, s: Tensor) -> Tensor:
        product = F.linear(x, v)
        ctx.save_for_backward(x, v, s)
        ctx.compute_dtype = product.dtype
        return product * s

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, v, s = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad_x = grad_v = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_x = F.linear((grad * s).to(dtype), v.to(dtype).t()).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat_grad = grad.reshape(-1, grad.shape[-1]).to(dtype)
            outer = (flat_grad.t() @ x.reshape(-1, x.shape[-1]).to(dtype)).to(v.dtype)  # G
            if ctx.needs_input_grad[2]:
                grad_s = torch.linalg.vecdot(outer, v).to(s.dtype)
            if ctx.needs_input_grad[1]:
                grad_v = outer.mul_(s.unsqueeze(1))
        return grad_x, grad_v, grad_s


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2-normalise -> weight-normalised prototype layer.

    Args:
        in_dim: Input feature size (the backbone's embedding dimension).
        out_dim: Number of prototypes (output size).
        hidden_dim: Width of the hidden MLP layers.
        bottleneck_dim: Output size of the MLP, input size of the last layer.
        nlayers: Number of linear layers in the MLP (1 means a single Linear(in_dim, bottleneck)).
        use_bn: Insert BatchNorm1d after each hidden linear layer.
        norm_last_layer: Freeze the weight-norm magnitude ``last_layer.weight_g`` at 1, so the
            prototypes stay unit-norm (DINO's default; more stable for ViTs).

    Forward accepts [..., in_dim] (e.g. [B, D] CLS tokens or [B, M, D] reference tokens) and
    returns [..., out_dim].
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("nlayers", nlayers),
        ):
            if value < 1:
                raise ValueError(f"DINOHead: {name} must be >= 1, got {value}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.mlp = self._build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        # DINO initialises the MLP only; the last layer keeps nn.Linear's default init.
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    @staticmethod
    def _build_mlp(
        in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool
    ) -> nn.Module:
        """Build the MLP with the same module indices as DINO (so state-dict keys match)."""
        if nlayers == 1:
            return nn.Linear(in_dim, bottleneck_dim)
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1)
        for d_in, d_out in itertools.pairwise(dims):
            layers.append(nn.Linear(d_in, d_out))
            if use_bn:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Map [..., in_dim] features to [..., out_dim] prototype scores."""
        if x.ndim < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(
                f"DINOHead expects input [..., {self.in_dim}], got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        # Flatten leading dims: BatchNorm1d only takes [N, C].
        x = self.mlp(x.reshape(-1, self.in_dim))
        x = F.normalize(x, dim=-1, p=2)
        x = self.last_layer(x)
        return x.reshape(*lead, self.out_dim)

    def cancel_last_layer_gradients(self) -> None:
        """Drop the last layer's gradients (DINO freezes it during the first epoch).

        Gradients are set to None rather than zero so the optimizer skips these parameters
        entirely (no momentum or weight-decay step), as DINO does.
        """
        for p in self.last_layer.parameters():
            p.grad = None


def cancel_last_layer_gradients(module: nn.Module) -> int:
    """Drop the last-layer gradients of every `DINOHead` inside `module`; return how many."""
    heads = [m for m in module.modules() if isinstance(m, DINOHead)]
    for head in heads:
        head.cancel_last_layer_gradients()
    return len(heads)


def _init_linear(m: nn.Module) -> None:
    """DINO's init: truncated normal (std 0.02) weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

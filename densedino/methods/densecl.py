"""DenseCL (Wang et al., CVPR 2021) on a ViT: MoCo v2 with a second, dense contrastive loss.

Read from the authors' code (WXinlong/DenseCL ``openselfsup/models/densecl.py``, ``necks.py``
``DenseCLNeck``, ``heads/contrastive_head.py``):

- A query encoder (the student here) and a key encoder (the teacher: its EMA, momentum 0.999,
  constant). View 0 is the query image, view 1 the key image; the loss is not symmetrised.
- Neck: global projection Linear-ReLU-Linear (2048 hidden, 128 out) on the pooled feature;
  dense projection, the same shape applied at every location (the authors' 1 x 1 convs); all
  outputs L2-normalised.
- Global loss: InfoNCE (temperature 0.2) of the query's global projection against the key's,
  with a queue of 65,536 keys as negatives.
- Dense loss: each query location i is matched with the key location
  ``argmax_j cos(backbone_q(i), backbone_k(j))`` (backbone features, not projections); InfoNCE
  of the dense projections at i and at the match, against a second queue. That queue stores,
  per key image, the mean of its dense projections (normalised), not individual locations.
- ``L = (1 - lambda) L_global + lambda L_dense``, lambda 0.5. Both queues are filled with the
  current keys after the loss (gathered from every rank).
- The query encoder is the one evaluated (``export_backbone``, used by the end-of-training
  export), as DenseCL's ``self.backbone``. Loaders of training checkpoints pick the teacher by
  default: use ``which='student'`` (``densedino-train export --which student``) for DenseCL.

For a ViT: the locations are the final-norm patch tokens; the global feature is the CLS token
(``global_feature='cls'``, default) or the mean patch token (``'mean'``, the ResNet recipe's
average pooling). Deviations: no shuffle-BN (a ViT and this neck have no batch norm); the
optional ``dense_warmup_iters`` (lambda = 0 before it) is the authors' ``DenseCLWarmupHook``,
which their released configs do not use (default 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedino.losses import KeyQueue, dense_correspondence, info_nce
from densedino.methods.base import Network, SSLMethod, StepState, make_teacher
from densedino.models.vit import build_backbone

GlobalFeature = Literal["cls", "mean"]


def _projection(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-ReLU-Linear, kaiming-normal (fan_in, ReLU) weights and zero biases as the
    authors' ``init_weights(init_linear='kaiming')``."""
    mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return mlp


class DenseCLNeck(nn.Module):
    """DenseCL's neck on ViT features: global and dense projections.

    Args:
        in_dim: backbone width.
        hidden_dim: hidden width of both projections (DenseCL: 2048).
        out_dim: projection width (DenseCL: 128).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.global_proj = _projection(in_dim, hidden_dim, out_dim)
        self.dense_proj = _projection(in_dim, hidden_dim, out_dim)

    def forward(self, pooled: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``pooled`` [B, D] and ``tokens`` [B, N, D] -> raw (not normalised) global [B, C],
        dense [B, N, C] and the mean dense projection [B, C] (the dense queue's entries)."""
        dense = self.dense_proj(tokens)
        return self.global_proj(pooled), dense, dense.mean(dim=1)


class DenseCL(SSLMethod):
    """DenseCL on the suite's trainer (see the module docstring).

    Args:
        arch, patch_size: backbone (``build_backbone``).
        feat_dim: projection width and queue key width (128).
        hidden_dim: hidden width of the projections (2048).
        queue_len: negatives per queue (65,536); need not divide by the batch.
        temperature: InfoNCE temperature (0.2).
        loss_lambda: weight of the dense loss (0.5).
        global_feature: ``cls`` or ``mean`` (patch tokens) as the global feature.
        dense_warmup_iters: iterations with lambda = 0 (authors' optional warm-up hook).
        drop_path_rate: stochastic depth of the query encoder (the key encoder has none).
        backbone: extra ``build_backbone`` arguments.

    The key encoder's momentum comes from the config's ``schedule.momentum``/``momentum_end``
    (set both to 0.999 for MoCo's constant momentum).
    """

    def __init__(
        self,
        arch: str = "vit_small",
        patch_size: int = 16,
        feat_dim: int = 128,
        hidden_dim: int = 2048,
        queue_len: int = 65536,
        temperature: float = 0.2,
        loss_lambda: float = 0.5,
        global_feature: GlobalFeature = "cls",
        dense_warmup_iters: int = 0,
        drop_path_rate: float = 0.0,
        backbone: dict | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= loss_lambda <= 1.0:
            raise ValueError(f"loss_lambda must be in [0, 1], got {loss_lambda}")
        if global_feature not in ("cls", "mean"):
            raise ValueError(f"global_feature must be 'cls' or 'mean', got {global_feature!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if queue_len < 1:
            raise ValueError(f"queue_len must be >= 1, got {queue_len}")
        if dense_warmup_iters < 0:
            raise ValueError(f"dense_warmup_iters must be >= 0, got {dense_warmup_iters}")
        self.temperature = temperature
        self.loss_lambda = loss_lambda
        self.global_feature: GlobalFeature = global_feature
        self.dense_warmup_iters = dense_warmup_iters
        vit = build_backbone(arch, patch_size, drop_path_rate=drop_path_rate, **(backbone or {}))
        neck = DenseCLNeck(vit.embed_dim, hidden_dim, feat_dim)
        self.student = Network(vit, {"neck": neck})
        self.teacher = make_teacher(self.student)
        self.queue = KeyQueue(feat_dim, queue_len)
        self.dense_queue = KeyQueue(feat_dim, queue_len)

    def export_backbone(self) -> nn.Module:
        """The query encoder's backbone (DenseCL evaluates ``encoder_q``, as MoCo does)."""
        return self.student.backbone

    def encode(self, net: nn.Module, images: Tensor) -> dict[str, Tensor]:
        """Backbone tokens and normalised projections of one view: ``tokens`` [B, N, D],
        ``global`` [B, C], ``dense`` [B, N, C], ``dense_mean`` [B, C]."""
        feats = net.backbone.forward_features(images)
        tokens = feats["patch"].flatten(1, 2)
        pooled = feats["cls"] if self.global_feature == "cls" else tokens.mean(dim=1)
        glob, dense, dense_mean = net.neck(pooled, tokens)
        return {
            "tokens": tokens,
            "global": F.normalize(glob, dim=-1),
            "dense": F.normalize(dense, dim=-1),
            "dense_mean": F.normalize(dense_mean, dim=-1),
        }

    def lambda_at(self, iteration: int) -> float:
        """The dense loss weight at ``iteration`` (0 during the optional warm-up)."""
        return 0.0 if iteration < self.dense_warmup_iters else self.loss_lambda

    def compute_losses(self, batch: dict, state: StepState) -> dict[str, Tensor]:
        views = batch["views"]
        self.check_views(views)
        query = self.encode(self.student, views[0])
        with torch.no_grad():
            key = self.encode(self.teacher, views[1])
        match = dense_correspondence(query["tokens"], key["tokens"])  # [B, Nq]
        matched = torch.gather(
            key["dense"], 1, match[..., None].expand(-1, -1, key["dense"].shape[-1])
        )
        loss_global = info_nce(query["global"], key["global"], self.queue.keys, self.temperature)
        loss_dense = info_nce(
            query["dense"].flatten(0, 1),
            matched.flatten(0, 1),
            self.dense_queue.keys,
            self.temperature,
        )
        lam = self.lambda_at(state.iteration)
        loss = (1.0 - lam) * loss_global + lam * loss_dense

        diagnostics = self.diagnostics(query, key, matched)
        # After the loss, which used copies of the queues (they change in place here).
        self.queue.enqueue(key["global"])
        self.dense_queue.enqueue(key["dense_mean"])
        return {
            "loss": loss,
            "loss_global": loss_global.detach(),
            "loss_dense": loss_dense.detach(),
            **diagnostics,
        }

    @torch.no_grad()
    def diagnostics(self, query: dict, key: dict, matched: Tensor) -> dict[str, Tensor]:
        """Collapse signals: ``feature_std`` of the key encoder's global projections (the
        :class:`CollapseMonitorHook` reads it; ~1 when spread on the sphere, 0 when all images
        map to one point), the same for the dense projections, and the mean positive
        similarities (global and dense)."""

        def spread(x: Tensor) -> Tensor:
            flat = x.flatten(0, -2).float()
            return flat.std(dim=0).mean() * math.sqrt(flat.shape[-1])

        return {
            "feature_std": spread(key["global"]),
            "dense_feature_std": spread(key["dense"]),
            "pos_sim": (query["global"] * key["global"]).sum(-1).mean(),
            "dense_pos_sim": (query["dense"] * matched).sum(-1).mean(),
        }

    def check_views(self, views: Sequence[Tensor]) -> None:
        if len(views) < 2:
            raise ValueError(f"DenseCL needs 2 views (query, key), got {len(views)}")
        if views[0].shape[0] != views[1].shape[0]:
            raise ValueError(
                f"DenseCL: query and key views hold different batch sizes: "
                f"{views[0].shape[0]} and {views[1].shape[0]}"
            )

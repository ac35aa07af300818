"""SelfPatch (Yun et al., CVPR 2022): DINO plus a patch-level loss towards neighbour aggregates.

Read from the authors' code (alinlab/SelfPatch, ``selfpatch_vision_transformer.py``:
``SelfPatchHead``, ``main_selfpatch.py``: ``MultiCropWrapper``, ``DINOLoss``):

- **Which side aggregates**: the teacher. For each teacher patch, the 8 patches of its 3 x 3
  window (the patch itself excluded) are ranked by the cosine similarity of the teacher's
  backbone tokens to the patch's token; the top ``k`` (4) are pooled by the class-attention
  blocks; the student's own patch token at the same position of the same view must predict
  that aggregate. The student never aggregates.
- **Where the aggregation module sits**: in the head, after the backbone. One small module
  (a learned query token, 2 CaiT class-attention blocks without layer scale, a LayerNorm) both
  pools the image into the image-level token (student and teacher, DINO loss) and pools each
  patch's neighbours (teacher only). The teacher's module is the EMA of the student's, which is
  trained through the image-level path only. The same LayerNorm also normalises the student's
  patch tokens before the patch head.
- **Border handling**: the window wraps around the grid (``(i +- 1) % size`` in the authors'
  ``get_local_index``): a corner patch's 8 neighbours are its 3 in-image neighbours plus 5
  patches from the opposite edges. ``border='mask'`` is the alternative: only in-image
  neighbours (3 at a corner, 5 on an edge, 8 inside); when fewer than ``k`` exist, the missing
  slots are masked out of the class attention (the authors' ``Class_Attention`` mask).
- **Views and losses**: the teacher processes all views (it needs every view's aggregates); the
  DINO loss pairs teacher view iq < 2 with every student view v != iq; the patch loss compares
  every view with itself; total ``L_dino + 0.1 * L_patch``. Separate patch head (4096
  prototypes on ImageNet) and patch center; the image-level center is updated with the teacher
  outputs of all views (as the authors do), the patch center with all teacher aggregates.

Deviations (the suite's ViT keeps timm's layout, which export, k-NN and the seg probe read):

- SelfPatch's ViT has no CLS token and no final norm. Here the backbone keeps both, the head
  pools the final-norm tokens and neighbour similarities use them too.
- ``image_token='cls'`` (default): the image-level token's query starts from the backbone's CLS
  output plus the learned query token, so that the CLS token, which the suite's k-NN protocol
  reads, is what the image-level DINO loss trains. ``image_token='query'`` is the authors'
  head exactly (the learned query alone pools the patch tokens; the backbone's CLS output is
  then trained by nothing). Either way the patch aggregates start from the learned query alone,
  as in the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from densedino.losses import PatchLoss
from densedino.losses.dino import teacher_probs
from densedino.methods.base import StepState, collapse_diagnostics, resolution_groups
from densedino.methods.dino import DINO
from densedino.models.heads import DINOHead
from densedino.models.vit import VisionTransformer

Border = Literal["wrap", "mask"]
ImageToken = Literal["cls", "query"]

_layer_norm = partial(nn.LayerNorm, eps=1e-6)
# The 3 x 3 window without its centre, row-major: (row offset, column offset).
_WINDOW = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


# ----------------------------------------------------------------------------- neighbourhoods
def neighbour_index(height: int, width: int, border: Border = "wrap") -> tuple[Tensor, Tensor]:
    """The 8 neighbours of every patch of a ``height x width`` grid (row-major patch order).

    Returns:
        ``index`` [N, 8] (long) and ``valid`` [N, 8] (bool), N = height * width, slots in the
        window's row-major order. ``wrap`` (SelfPatch): indices wrap around the grid, every
        slot is valid (needs a grid of at least 3 x 3, else neighbours would repeat).
        ``mask``: out-of-grid slots are invalid and hold the patch's own index (a placeholder
        that must not be used).
    """
    if border not in ("wrap", "mask"):
        raise ValueError(f"border must be 'wrap' or 'mask', got {border!r}")
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1 x 1, got {height} x {width}")
    if border == "wrap" and (height < 3 or width < 3):
        raise ValueError(
            f"border='wrap' needs a grid of at least 3 x 3 patches (the 3 x 3 window would "
            f"repeat patches), got {height} x {width}; use border='mask'"
        )
    rows = torch.arange(height).repeat_interleave(width)  # [N]
    cols = torch.arange(width).repeat(height)
    dr = torch.tensor([o[0] for o in _WINDOW])  # [8]
    dc = torch.tensor([o[1] for o in _WINDOW])
    r = rows[:, None] + dr  # [N, 8]
    c = cols[:, None] + dc
    if border == "wrap":
        index = (r % height) * width + c % width
        return index, torch.ones_like(index, dtype=torch.bool)
    valid = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    own = (rows * width + cols)[:, None].expand_as(r)
    index = torch.where(valid, r * width + c, own)
    return index, valid


def select_neighbours(
    tokens: Tensor, index: Tensor, valid: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """The ``k`` neighbours of each patch most similar to it (cosine of ``tokens``).

    Args:
        tokens: [B, N, D] patch tokens (row-major).
        index, valid: [N, S] neighbour slots from :func:`neighbour_index`.
        k: neighbours kept, ``1 <= k <= S``.

    Returns:
        ``chosen`` [B, N, k]: patch indices, most similar first; ``chosen_valid`` [B, N, k]:
        False where a patch has fewer than ``k`` valid neighbours (those slots come last).
    """
    if tokens.ndim != 3 or tokens.shape[1] != index.shape[0]:
        raise ValueError(
            f"tokens must be [B, N={index.shape[0]}, D], got shape {tuple(tokens.shape)}"
        )
    if not 1 <= k <= index.shape[1]:
        raise ValueError(f"k must be in [1, {index.shape[1]}], got {k}")
    unit = F.normalize(tokens.float(), dim=-1)
    sims = torch.einsum("bnsd,bnd->bns", unit[:, index], unit)  # [B, N, S]
    sims = sims.masked_fill(~valid, float("-inf"))
    slots = sims.topk(k, dim=-1).indices  # [B, N, k]
    batch = tokens.shape[0]
    chosen = torch.gather(index.expand(batch, -1, -1), 2, slots)
    chosen_valid = torch.gather(valid.expand(batch, -1, -1), 2, slots)
    return chosen, chosen_valid


# ---------------------------------------------------------------------------- class attention
class ClassAttention(nn.Module):
    """Multi-head attention of the first token (the query) over the whole sequence (CaiT)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_valid: Tensor | None = None) -> Tensor:
        """``x`` [B, 1 + L, D] (query first); ``key_valid`` [B, L] masks keys 1..L (the query
        itself always stays visible). Returns the query's update [B, 1, D]."""
        batch, length, dim = x.shape
        heads = self.num_heads
        q = self.q(x[:, :1]).reshape(batch, 1, heads, -1).transpose(1, 2) * self.scale
        k = self.k(x).reshape(batch, length, heads, -1).transpose(1, 2)
        v = self.v(x).reshape(batch, length, heads, -1).transpose(1, 2)
        attn = q @ k.transpose(-2, -1)  # [B, heads, 1, 1 + L]
        if key_valid is not None:
            visible = torch.cat([key_valid.new_ones(batch, 1), key_valid], dim=1)
            attn = attn.masked_fill(~visible[:, None, None, :], float("-inf"))
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, 1, dim)
        return self.proj(out)


class ClassAttentionBlock(nn.Module):
    """CaiT's class-attention block (SelfPatch's ``LayerScale_Block_CA``, no layer scale, no
    stochastic depth): only the query token is updated."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = ClassAttention(dim, num_heads)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, tokens: Tensor, query: Tensor, key_valid: Tensor | None = None) -> Tensor:
        """``tokens`` [B, L, D], ``query`` [B, 1, D] -> updated query [B, 1, D]."""
        seq = torch.cat([query, tokens], dim=1)
        query = query + self.attn(self.norm1(seq), key_valid)
        return query + self.mlp(self.norm2(query))


class PatchAggregator(nn.Module):
    """SelfPatch's ``SelfPatchHead``: a learned query token, class-attention blocks, a LayerNorm.

    It pools a set of tokens into one: all patches of an image (the image-level token) or a
    patch's selected neighbours (the teacher's patch target).

    Args:
        dim: token width.
        num_heads: attention heads (SelfPatch: the backbone's).
        depth: class-attention blocks (SelfPatch: 2).
        mlp_ratio: hidden width of the blocks' MLP relative to ``dim``.
    """

    def __init__(self, dim: int, num_heads: int, depth: int = 2, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"PatchAggregator: depth must be >= 1, got {depth}")
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            ClassAttentionBlock(dim, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.norm = _layer_norm(dim)
        trunc_normal_(self.query_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self, tokens: Tensor, start: Tensor | None = None, key_valid: Tensor | None = None
    ) -> Tensor:
        """Pool ``tokens`` [B, L, D] into [B, D] (after the LayerNorm).

        ``start`` [B, D] is added to the learned query token (the backbone's CLS for the
        image-level token with ``image_token='cls'``); ``key_valid`` [B, L] masks tokens out.
        """
        query = self.query_token.expand(tokens.shape[0], -1, -1)
        if start is not None:
            query = query + start[:, None]
        for block in self.blocks:
            query = block(tokens, query, key_valid)
        return self.norm(query[:, 0])


# ----------------------------------------------------------------------------------- method
def backbone_views(backbone: VisionTransformer, views: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """Final-norm ``cls`` [B, D] and ``patch`` [B, h, w, D] of every view, batching views of
    equal size in one forward pass."""
    outputs: list[dict[str, Tensor]] = []
    for start, end in resolution_groups(views):
        out = backbone.forward_features(torch.cat(list(views[start:end])))
        chunks = zip(out["cls"].chunk(end - start), out["patch"].chunk(end - start), strict=True)
        outputs.extend({"cls": cls, "patch": patch} for cls, patch in chunks)
    return outputs


class SelfPatch(DINO):
    """DINO on an image-level token plus SelfPatch's patch loss (see the module docstring).

    Args (beyond :class:`DINO`):
        patch_out_dim: prototypes of the patch head (SelfPatch: 4096).
        num_neighbours: k, the neighbours pooled per patch (SelfPatch: 4).
        patch_weight: weight of the patch loss in ``L_dino + patch_weight * L_patch`` (0.1).
        border: ``wrap`` (SelfPatch) or ``mask`` (see :func:`neighbour_index`).
        image_token: ``cls`` (backbone CLS + learned query, the default here) or ``query`` (the
            authors' head: learned query alone).
        aggregator_depth: class-attention blocks of the aggregator (2).
    """

    def __init__(
        self,
        patch_out_dim: int = 4096,
        num_neighbours: int = 4,
        patch_weight: float = 0.1,
        border: Border = "wrap",
        image_token: ImageToken = "cls",
        aggregator_depth: int = 2,
        **dino_kwargs: Any,
    ) -> None:
        if border not in ("wrap", "mask"):
            raise ValueError(f"border must be 'wrap' or 'mask', got {border!r}")
        if image_token not in ("cls", "query"):
            raise ValueError(f"image_token must be 'cls' or 'query', got {image_token!r}")
        if not 1 <= num_neighbours <= len(_WINDOW):
            raise ValueError(f"num_neighbours must be in [1, 8], got {num_neighbours}")
        if patch_weight < 0:
            raise ValueError(f"patch_weight must be >= 0, got {patch_weight}")
        # Read by build_heads, which DINO.__init__ calls.
        self.patch_out_dim = patch_out_dim
        self.aggregator_depth = aggregator_depth
        super().__init__(**dino_kwargs)
        self.num_neighbours = num_neighbours
        self.patch_weight = patch_weight
        self.border: Border = border
        self.image_token: ImageToken = image_token
        self.patch_loss = PatchLoss(
            patch_out_dim, self.dino_loss.student_temp, self.dino_loss.centering.momentum
        )
        self._neighbours: dict[tuple[int, int, str], tuple[Tensor, Tensor]] = {}

    def build_heads(
        self, backbone: VisionTransformer, out_dim: int, head_kw: dict
    ) -> dict[str, nn.Module]:
        heads = super().build_heads(backbone, out_dim, head_kw)
        dim = backbone.embed_dim
        heads["patch_head"] = DINOHead(dim, self.patch_out_dim, **head_kw)
        heads["aggregator"] = PatchAggregator(dim, backbone.num_heads, self.aggregator_depth)
        return heads

    def neighbours(self, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Cached :func:`neighbour_index` of a grid, on ``device``."""
        key = (height, width, str(device))
        if key not in self._neighbours:
            index, valid = neighbour_index(height, width, self.border)
            self._neighbours[key] = (index.to(device), valid.to(device))
        return self._neighbours[key]

    def image_tokens(self, net: nn.Module, feats: Sequence[dict[str, Tensor]]) -> Tensor:
        """Image-level tokens [V, B, D] of every view, pooled by ``net.aggregator``."""
        tokens = []
        for f in feats:
            start = f["cls"] if self.image_token == "cls" else None
            tokens.append(net.aggregator(f["patch"].flatten(1, 2), start))
        return torch.stack(tokens)

    def aggregate_neighbours(self, net: nn.Module, patch: Tensor) -> Tensor:
        """The aggregate [B, N, D] of every patch's top-k neighbours (``patch`` [B, h, w, D])."""
        batch, height, width, dim = patch.shape
        tokens = patch.reshape(batch, height * width, dim)
        index, valid = self.neighbours(height, width, patch.device)
        chosen, chosen_valid = select_neighbours(tokens, index, valid, self.num_neighbours)
        neighbours = tokens[torch.arange(batch, device=patch.device)[:, None, None], chosen]
        key_valid = None if bool(chosen_valid.all()) else chosen_valid.flatten(0, 1)
        pooled = net.aggregator(neighbours.flatten(0, 1), None, key_valid)  # [B*N, D]
        return pooled.reshape(batch, height * width, dim)

    def compute_losses(self, batch: dict, state: StepState) -> dict[str, Tensor]:
        views = batch["views"]
        self.check_views(views)
        temp = state.teacher_temp
        with torch.no_grad():
            t_feats = backbone_views(self.teacher.backbone, views)
            t_image = self.image_tokens(self.teacher, t_feats)  # [V, B, D]
            t_out = self.teacher.head(t_image)
            t_agg = [self.aggregate_neighbours(self.teacher, f["patch"]) for f in t_feats]
            t_patch_out = [self.teacher.patch_head(a) for a in t_agg]
        s_feats = backbone_views(self.student.backbone, views)
        s_out = self.student.head(self.image_tokens(self.student, s_feats))
        s_patch_out = [
            self.student.patch_head(self.student.aggregator.norm(f["patch"].flatten(1, 2)))
            for f in s_feats
        ]
        probs = teacher_probs(t_out[: self.num_teacher], self.dino_loss.center, temp)
        loss_cls = self.dino_loss.from_probs(s_out, probs, self.pairs(len(views)))
        loss_patch = self.patch_loss(s_patch_out, t_patch_out, temp)
        loss = loss_cls + self.patch_weight * loss_patch

        diagnostics = collapse_diagnostics(t_image[: self.num_teacher], probs)
        patch_probs = teacher_probs(t_patch_out[0], self.patch_loss.center, temp)
        patch_diag = collapse_diagnostics(t_agg[0], patch_probs)
        self.dino_loss.update_center(t_out)  # all views, as the authors do
        self.patch_loss.update_center(t_patch_out)
        return {
            "loss": loss,
            "loss_cls": loss_cls.detach(),
            "loss_patch": loss_patch.detach(),
            **diagnostics,
            "patch_feature_std": patch_diag["feature_std"],
            "patch_teacher_entropy": patch_diag["teacher_entropy"],
        }

"""Vision Transformer backbone on timm blocks, with DenseDINO reference tokens.

Parameter names equal those of timm's ``VisionTransformer`` (and DINO's), so their state dicts
load without renaming. Reference tokens (method reference, section 2) are optional: without
them the forward pass is the plain ViT.

Position embeddings at a grid other than the native one (``pos_interp``):

- ``"dino"`` (default): DINO's and the DenseDINO authors' ``interpolate_pos_encoding``: bicubic
  ``F.interpolate`` of the native grid with ``scale_factor = (g' + 0.1) / g`` per axis (g' the
  new grid side, g the native one), ``align_corners=False``, no antialias; the native square size
  uses the grid as it is. DINO-format weights give DINO's own features at every size.
- ``"timm"``: timm's ``resample_abs_pos_embed`` (``dynamic_img_size=True``): bicubic by target
  size, antialiased when shrinking. Features equal timm's ``forward_features`` at every size.

Reference tokens always sample the *native* grid at their point (as the authors do), so at the
native size a token at a patch centre carries exactly that patch's position embedding; at other
sizes it differs from the patch's interpolated one (``tests/test_vit.py`` pins by how much).

Reference tokens do not go through a masked attention over the whole sequence. CLS and patches
run each block's plain attention (fused SDPA kernels apply; their outputs are the plain ViT's),
and the M reference tokens attend to [patch keys and values; their own key and value] in a
second, small attention with the block's weights; qkv, projection and MLP run once over all
tokens. This equals the authors' additive mask ``all2pos_pos2cls_eye`` (no token reads a
reference token; a reference token reads the patches and itself), which
:func:`reference_attention_mask` builds and the tests use as the oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

RefContent = Literal["zero", "learnable"]
RefPadding = Literal["zeros", "border"]
PosInterp = Literal["dino", "timm"]
POS_INTERPS: tuple[str, ...] = ("dino", "timm")

# arch name -> (embed_dim, num_heads); every arch has depth 12 and MLP ratio 4.
ARCHS: dict[str, tuple[int, int]] = {
    "vit_tiny": (192, 3),
    "vit_small": (384, 6),
    "vit_base": (768, 12),
}
PATCH_SIZES = (8, 16)
# Points at the view's edge come out of float arithmetic a few ulps past +-1.
POINT_TOLERANCE = 1e-5

# timm's Block passes device/dtype keywords to its norm layer.
_layer_norm = partial(nn.LayerNorm, eps=1e-6)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: images [B, C, H, W] -> tokens [B, H/p, W/p, D]."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """Project patches; the spatial size must be a multiple of the patch size."""
        if images.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {self.patch_size}"
            )
        return self.proj(images).permute(0, 2, 3, 1)


def reference_attention_mask(
    num_refs: int, num_patches: int, device: torch.device | None = None
) -> Tensor:
    """Boolean mask [L, L] for the sequence [CLS | REF_1..M | PATCH_1..N] (True = may attend).

    No token attends to a reference token except that token itself; a reference token attends
    to every patch and to itself, not to CLS nor to the other references. CLS and patch rows
    therefore see exactly the plain ViT's keys.
    """
    length = 1 + num_refs + num_patches
    mask = torch.ones(length, length, dtype=torch.bool, device=device)
    refs = slice(1, 1 + num_refs)
    mask[:, refs] = False
    mask[refs, 0] = False
    idx = torch.arange(1, 1 + num_refs, device=device)
    mask[idx, idx] = True
    return mask


def interpolate_pos_dino(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """DINO's ``interpolate_pos_encoding`` of a patch grid [1, D, g, g] to ``size`` = (h, w).

    Returns [1, h * w, D]. DINO keeps the native square grid as it is and otherwise calls
    bicubic ``F.interpolate(scale_factor=((h + 0.1) / g, (w + 0.1) / g))`` (no antialias), which
    reads output cell j at the grid coordinate (j + 0.5) g / (h + 0.1) - 0.5: the point
    x_j = (2j + 1) / (h + 0.1) - 1 in ``grid_sample``'s [-1, 1] frame, whatever g. Sampling
    those points bicubically with clamped taps (border padding, the same cubic kernel) gives
    the same values and no size arithmetic, so the ONNX export stays exact at every size
    (``tests/test_pos_embed.py`` pins both forms against the formula).
    """
    h, w = size
    native = (h == grid.shape[-2]) & (w == grid.shape[-1])
    shift = torch.sym_ite(native, 0.0, 0.1)  # no Python branch: sizes may be symbolic
    ys = (2 * torch.arange(h, device=grid.device, dtype=grid.dtype) + 1) / (h + shift) - 1
    xs = (2 * torch.arange(w, device=grid.device, dtype=grid.dtype) + 1) / (w + shift) - 1
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [h, w, (x, y)]
    sampled = F.grid_sample(
        grid, points[None], mode="bicubic", padding_mode="border", align_corners=False
    )
    return sampled.flatten(2).transpose(1, 2)


def check_ref_points(ref_points: Tensor, batch: int) -> None:
    """Refuse reference points that are not [B, M, 2] floats in [-1, 1].

    A NaN point makes a NaN token (and, under an additive mask, NaN everywhere); a point
    outside [-1, 1] lies outside the view. On CPU the value check is a
    ValueError; on an accelerator it is an asynchronous device assertion, so the training step
    does not wait for the host.
    """
    if ref_points.ndim != 3 or ref_points.shape[-1] != 2 or ref_points.shape[0] != batch:
        raise ValueError(
            f"ref_points must have shape [B={batch}, M, 2], got {tuple(ref_points.shape)}"
        )
    if not ref_points.is_floating_point():
        raise ValueError(f"ref_points must be floating point, got {ref_points.dtype}")
    ok = (ref_points.abs() <= 1.0 + POINT_TOLERANCE).all()  # False for NaN
    message = "ref_points must be finite and inside [-1, 1] (x, y of the view)"
    if ref_points.device.type == "cpu":
        if not bool(ok):
            raise ValueError(f"{message}; got min {ref_points.min()}, max {ref_points.max()}")
    else:
        torch._assert_async(ok, message)


def _qkv(block: Block, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The block's q, k, v [B, heads, L, head_dim] for ``x`` [B, L, D] (q/k norms applied)."""
    attn = block.attn
    batch, length, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, length, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def block_with_references(block: Block, x: Tensor, num_refs: int) -> Tensor:
    """One timm block on [CLS | PATCH_1..N | REF_1..M] with the reference tokens' attention.

    CLS and patches attend to each other only (plain attention, fused kernels); each reference
    attends to the N patches and to itself. qkv, projection, MLP and stochastic depth run over
    the whole sequence once, so a sample's drop-path draw is shared by all its tokens.
    """
    attn = block.attn
    dropout = attn.attn_drop.p if block.training else 0.0
    q, k, v = _qkv(block, x)
    end = x.shape[1] - num_refs
    main = F.scaled_dot_product_attention(
        q[:, :, :end], k[:, :, :end], v[:, :, :end], dropout_p=dropout
    )
    # Keys of a reference: the patches, then the references; the mask keeps only its own.
    allowed = torch.ones(num_refs, end - 1 + num_refs, dtype=torch.bool, device=x.device)
    allowed[:, end - 1 :] = torch.eye(num_refs, dtype=torch.bool, device=x.device)
    refs = F.scaled_dot_product_attention(
        q[:, :, end:], k[:, :, 1:], v[:, :, 1:], attn_mask=allowed, dropout_p=dropout
    )
    out = torch.cat([main, refs], dim=2).transpose(1, 2).flatten(2)
    out = attn.proj_drop(attn.proj(getattr(attn, "norm", nn.Identity())(out)))
    x = x + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT (CLS token, learned absolute positions, pre-norm timm blocks) with reference tokens."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        ref_content: RefContent = "zero",
        ref_padding: RefPadding = "zeros",
        pos_interp: PosInterp = "dino",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if ref_content not in ("zero", "learnable"):
            raise ValueError(f"ref_content must be 'zero' or 'learnable', got {ref_content!r}")
        if ref_padding not in ("zeros", "border"):
            raise ValueError(f"ref_padding must be 'zeros' or 'border', got {ref_padding!r}")
        if pos_interp not in POS_INTERPS:
            raise ValueError(f"pos_interp must be one of {POS_INTERPS}, got {pos_interp!r}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.ref_content: RefContent = ref_content
        self.ref_padding: RefPadding = ref_padding
        self.pos_interp: PosInterp = pos_interp
        self.grid_size = (img_size // patch_size, img_size // patch_size)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        if ref_content == "learnable":
            # One content vector shared by all reference tokens (only created when learnable so
            # that the default state dict stays exactly timm's).
            self.ref_token: nn.Parameter | None = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.ref_token = None
        # Stochastic depth grows linearly with depth, as in DINO and timm (plain Python, so
        # that the model can be built on the meta device).
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                drop_path=rate,
                norm_layer=_layer_norm,
            )
            for rate in rates
        )
        self.norm = _layer_norm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """DINO/timm init: trunc-normal 0.02 for tokens, positions and Linear; LN ones/zeros."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.ref_token is not None:
            trunc_normal_(self.ref_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------- embeddings
    def patch_pos_grid(self) -> Tensor:
        """The learned patch position grid as an image [1, D, gh, gw] (CLS position excluded)."""
        gh, gw = self.grid_size
        return self.pos_embed[:, 1:].reshape(1, gh, gw, self.embed_dim).permute(0, 3, 1, 2)

    def patch_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Patch position embeddings [1, h * w, D] for a patch grid of ``grid`` = (h, w)."""
        if self.pos_interp == "timm":
            pos = resample_abs_pos_embed(
                self.pos_embed, new_size=grid, old_size=self.grid_size, num_prefix_tokens=1
            )
            return pos[:, 1:]
        return interpolate_pos_dino(self.patch_pos_grid(), grid)

    def reference_pos_embed(self, ref_points: Tensor) -> Tensor:
        """Positional embeddings [B, M, D] of points [B, M, 2] in [-1, 1], (x, y) order.

        Bicubic sampling of the native learned grid with align_corners=False, so that a patch
        centre maps exactly onto its grid node.
        """
        batch, num_refs = ref_points.shape[:2]
        grid = self.patch_pos_grid()
        points = ref_points.to(grid.dtype).reshape(1, 1, batch * num_refs, 2)
        sampled = F.grid_sample(
            grid, points, mode="bicubic", padding_mode=self.ref_padding, align_corners=False
        )  # [1, D, 1, B*M]
        return sampled.reshape(self.embed_dim, batch, num_refs).permute(1, 2, 0)

    def reference_tokens(self, ref_points: Tensor) -> Tensor:
        """Reference tokens [B, M, D]: content (zero or the learnable token) + position."""
        tokens = self.reference_pos_embed(ref_points)
        if self.ref_token is not None:
            tokens = tokens + self.ref_token
        return tokens

    def _embed(
        self, images: Tensor, ref_points: Tensor | None
    ) -> tuple[Tensor, tuple[int, int], int]:
        """Token sequence [CLS | PATCH_1..N | REF_1..M], patch grid size and M.

        The references go last inside the model only; outputs keep the order of the method
        reference ([CLS | REF | PATCH] for attention maps).
        """
        x = self.patch_embed(images)
        batch, gh, gw, dim = x.shape
        x = x.reshape(batch, gh * gw, dim) + self.patch_pos_embed((gh, gw))
        cls = self.cls_token + self.pos_embed[:, :1]
        x = torch.cat([cls.expand(batch, -1, -1), x], dim=1)
        if ref_points is None:
            return x, (gh, gw), 0
        check_ref_points(ref_points, batch)
        num_refs = ref_points.shape[1]
        if num_refs:
            x = torch.cat([x, self.reference_tokens(ref_points).to(x.dtype)], dim=1)
        return x, (gh, gw), num_refs

    def _blocks(self, x: Tensor, num_refs: int, blocks: Sequence[Block] | None = None) -> Tensor:
        for block in self.blocks if blocks is None else blocks:
            x = block(x) if num_refs == 0 else block_with_references(block, x, num_refs)
        return x

    # -------------------------------------------------------------------------------- forward
    def _split(self, x: Tensor, grid: tuple[int, int], num_refs: int) -> dict[str, Tensor]:
        """Split a normalised sequence into cls [B, D], patch [B, h, w, D] and ref [B, M, D]."""
        end = x.shape[1] - num_refs
        out = {"cls": x[:, 0], "patch": x[:, 1:end].reshape(x.shape[0], *grid, -1)}
        if num_refs:
            out["ref"] = x[:, end:]
        return out

    def forward_features(
        self, images: Tensor, ref_points: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Final-norm features: ``cls`` [B, D], ``patch`` [B, h, w, D], ``ref`` [B, M, D].

        ``ref`` is present only when ``ref_points`` [B, M, 2] (x, y in [-1, 1]) is given.
        """
        x, grid, num_refs = self._embed(images, ref_points)
        out = self._split(self.norm(self._blocks(x, num_refs)), grid, num_refs)
        if ref_points is not None and not num_refs:
            out["ref"] = x.new_zeros(x.shape[0], 0, self.embed_dim)
        return out

    def forward(self, images: Tensor) -> Tensor:
        """CLS feature [B, D] after the final norm."""
        return self.forward_features(images)["cls"]

    def get_last_selfattention(self, images: Tensor, ref_points: Tensor | None = None) -> Tensor:
        """Softmax attention [B, heads, L, L] of the last block over [CLS | REF | PATCH].

        The reference mask is applied, so the rows and columns of the references read as in the
        authors' masked attention.
        """
        if not self.blocks:
            raise ValueError("a model without blocks has no attention")
        x, _, num_refs = self._embed(images, ref_points)
        x = self._blocks(x, num_refs, self.blocks[:-1])
        if num_refs:  # to the public order [CLS | REF | PATCH]
            end = x.shape[1] - num_refs
            x = torch.cat([x[:, :1], x[:, end:], x[:, 1:end]], dim=1)
        block = self.blocks[-1]
        q, k, _ = _qkv(block, x)
        scores = (q * block.attn.scale) @ k.transpose(-2, -1)
        if num_refs:
            mask = reference_attention_mask(num_refs, x.shape[1] - 1 - num_refs, x.device)
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1)

    def cls_attention_maps(self, images: Tensor) -> Tensor:
        """Last-block attention of CLS over the patches, one map per head: [B, heads, h, w]."""
        attn = self.get_last_selfattention(images)
        gh, gw = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        return attn[:, :, 0, 1:].reshape(attn.shape[0], attn.shape[1], gh, gw)

    def get_intermediate_layers(
        self, images: Tensor, n: int | Sequence[int] = 1, norm: bool = True
    ) -> list[dict[str, Tensor]]:
        """Outputs ({cls, patch}) of the last ``n`` blocks, or of the listed block indices.

        Like DINO's: with ``norm`` the final LayerNorm is applied to every returned output.
        Negative indices count from the end.
        """
        wanted = self._block_indices(n)
        x, grid, _ = self._embed(images, None)
        outputs: list[dict[str, Tensor]] = []
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            x = block(x)
            if i in wanted:
                outputs.append(self._split(self.norm(x) if norm else x, grid, 0))
        return outputs

    def _block_indices(self, n: int | Sequence[int]) -> set[int]:
        if isinstance(n, int):
            if not 1 <= n <= self.depth:
                raise ValueError(f"n must be in [1, {self.depth}], got {n}")
            return set(range(self.depth - n, self.depth))
        indices = {i + self.depth if i < 0 else i for i in n}
        if not indices or any(not 0 <= i < self.depth for i in indices):
            raise ValueError(f"block indices must be in [-{self.depth}, {self.depth}), got {n}")
        return indices


def build_backbone(arch: str, patch_size: int = 16, **kw: object) -> VisionTransformer:
    """Build ``vit_tiny`` / ``vit_small`` / ``vit_base`` (depth 12) with patch 16 or 8.

    Extra keyword arguments go to :class:`VisionTransformer` (e.g. ``drop_path_rate``,
    ``ref_content``, ``ref_padding``, ``depth``).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    if patch_size not in PATCH_SIZES:
        raise ValueError(f"patch_size must be one of {PATCH_SIZES}, got {patch_size}")
    embed_dim, num_heads = ARCHS[arch]
    kw.setdefault("depth", 12)
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, num_heads=num_heads, **kw)  # type: ignore[arg-type]


def arch_name(model: VisionTransformer) -> str | None:
    """The arch name matching the model's width and heads, or None for a custom shape."""
    for name, (dim, heads) in ARCHS.items():
        if (model.embed_dim, model.num_heads) == (dim, heads):
            return name
    return None

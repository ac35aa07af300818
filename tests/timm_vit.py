"""A small timm ViT with everything --timm must handle, saved as a user's downloaded weights
would be (imported by file name, like ``cli_runs``): DINOv2's ViT-S/14 with 4 register tokens
and layer scale, cut to 2 blocks so that it runs in milliseconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TIMM_NAME = "vit_small_patch14_reg4_dinov2"
PREFIX_TOKENS = 5  # CLS + 4 registers
EMBED_DIM = 384


def timm_vit(seed: int = 0) -> nn.Module:
    """The model itself, built the way a user of timm would (no densedino code involved)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        TIMM_NAME, pretrained=False, depth=2, num_classes=0, dynamic_img_size=True
    )
    assert model.num_prefix_tokens == PREFIX_TOKENS
    with torch.no_grad():
        # timm starts layer scale at 1e-5 and the CLS and register tokens at ~1e-6 (and adds
        # no position to them): the blocks would barely count and the five prefix tokens would
        # come out alike. Pretrained weights are neither; neither are these.
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.fill_(1.0)
        model.cls_token.normal_()
        model.reg_token.normal_()
    return model.eval()


def random_timm_vit(path: Path, seed: int = 0) -> Path:
    """:func:`timm_vit` (random weights of `seed`) saved to `path` (.safetensors or .pth)."""
    state = timm_vit(seed).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path

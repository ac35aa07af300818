"""Backbone weights I/O: safe loading of every supported checkpoint format, safetensors export.

Formats read by :func:`load_backbone`:

- ``.safetensors`` written by :func:`save_backbone` (architecture in the metadata header) or
  any other safetensors file holding a bare ViT state dict;
- our training checkpoints (mmengine: ``state_dict`` with ``teacher.backbone.`` /
  ``student.backbone.`` keys, maybe behind ``module.``);
- DINO ``main_dino.py`` training checkpoints (``teacher`` / ``student`` entries with
  ``module.``, ``backbone.`` and ``head.`` prefixes, beside ``args`` pickled as an
  ``argparse.Namespace``, ``optimizer``, ``dino_loss``, ``fp16_scaler`` and ``epoch``);
- the DenseDINO authors' checkpoints (GitHub ``yyk-wew/DenseDINO``): the same layout with the
  position embedding split into ``cls_pos_embed`` [1, 1, D] and ``patch_pos_embed`` [1, N, D],
  an optional learnable reference content ``ref_learn_token`` and a ``ref_head``; as a training
  checkpoint, a wrapper state dict (``backbone.``/``head.``/``ref_head.``) or a bare backbone;
- bare timm / DINO state dicts (a timm classifier ``head.*`` is dropped), or ``{"model": ...}``;
- an in-memory mapping of any of the above.

Pickled files are read with ``torch.load(weights_only=True)``: code is never unpickled, and the
only classes rebuilt are those of :func:`safe_globals_for_checkpoints`, none of which runs code
when unpickled.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor

from densedino.models.vit import ARCHS, PosInterp, VisionTransformer, arch_name

FORMAT_TAG = "densedino.backbone"
_ARCH_KEYS = (
    "format",
    "arch",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "img_size",
    "ref_content",
    "ref_padding",
    "pos_interp",
)
_WHICH = ("teacher", "student")
_HISTORY_BUFFER_METHODS = ("min", "max", "current", "mean")


# ------------------------------------------------------------------------------ safe unpickling
def _history_buffer_getattr(obj: object, name: str) -> object:
    """Stand-in for ``getattr`` in checkpoints: only HistoryBuffer's statistics methods.

    mmengine pickles ``HistoryBuffer._statistics_methods`` as ``getattr(HistoryBuffer, 'min')``
    etc.; allowing the real ``getattr`` would open every attribute of every allowed object.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is not HistoryBuffer or name not in _HISTORY_BUFFER_METHODS:
        raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not allowed")
    return getattr(obj, name)


def safe_globals_for_checkpoints() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """Globals allowed when reading training checkpoints with ``weights_only=True``.

    Exactly what mmengine's ``message_hub`` state needs: numpy scalars and arrays (under both
    numpy 1 and numpy 2 module names), numeric numpy dtypes, and mmengine's ``HistoryBuffer``
    with a ``getattr`` restricted to its statistics methods; and what DINO's ``main_dino.py``
    (and the DenseDINO authors' copy of it) pickles besides tensors and plain containers: its
    ``args``, an ``argparse.Namespace`` (rebuilt by ``object.__new__`` plus an attribute update,
    so no code of the file runs; its values must themselves be plain or allowed). Use with
    ``torch.serialization.safe_globals(...)``.
    """
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        np.ndarray,
        np.dtype,
        argparse.Namespace,
    ]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [
            (core.scalar, f"{module}.scalar"),
            (core._reconstruct, f"{module}._reconstruct"),
        ]
    numeric = (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    )
    allowed += [type(np.dtype(t)) for t in numeric]  # BUILD on a dtype needs its class
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:
        return allowed
    allowed += [
        HistoryBuffer,
        (_history_buffer_getattr, "builtins.getattr"),
        (_history_buffer_getattr, "__builtin__.getattr"),
    ]
    return allowed


_ALLOWED = False


def allow_checkpoint_globals() -> None:
    """Register :func:`safe_globals_for_checkpoints` process-wide, once.

    Process-wide rather than with ``torch.serialization.safe_globals(...)``: that context
    manager removes on exit what it added, including entries registered before it, which
    would break every later load (e.g. mmengine's resume) in the same process.
    """
    global _ALLOWED
    if not _ALLOWED:
        torch.serialization.add_safe_globals(safe_globals_for_checkpoints())
        _ALLOWED = True


def _torch_load(path: Path) -> Any:
    """``torch.load`` on CPU that refuses anything but tensors, containers and allowed globals."""
    allow_checkpoint_globals()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).splitlines()
        reason = next(
            (ln for ln in lines if "WeightsUnpickler error" in ln),
            lines[0] if lines else "unsupported object",
        ).strip()
        raise ValueError(
            f"refusing to unpickle {path}: it holds objects other than tensors and plain "
            f"containers ({reason}). If you trust its source, convert it in a separate step "
            "(torch.load(..., weights_only=False), keep the backbone tensors) and save them "
            "with safetensors.torch.save_file or densedino.weights.save_backbone, or export "
            "the checkpoint as safetensors."
        ) from err


# ------------------------------------------------------------------------- state-dict extraction
def _strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove DistributedDataParallel ``module.`` segments (also after ``teacher.`` etc.).

    Every key segment equal to ``module`` goes; no ViT parameter has such a segment.
    """
    out = {}
    for key, value in state.items():
        parts = [p for p in key.split(".") if p != "module"]
        out[".".join(parts)] = value
    return out


def _select_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _select_segment(state: Mapping[str, Any], marker: str) -> dict[str, Any]:
    """Entries whose key contains ``marker`` at a segment boundary, with everything up to and
    including it removed (``method.teacher.backbone.x`` -> ``x`` for ``teacher.backbone.``)."""
    out = {}
    for key, value in state.items():
        at = key.find(marker)
        if at == 0 or (at > 0 and key[at - 1] == "."):
            out[key[at + len(marker) :]] = value
    return out


_HEAD_PREFIXES = ("head.", "ref_head.")


def _backbone_part(state: Mapping[str, Any]) -> dict[str, Any]:
    """From a model state dict: the ``backbone.`` entries, or all but the heads otherwise."""
    state = _strip_module(state)
    backbone = _select_prefix(state, "backbone.")
    if backbone:
        return backbone
    return {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}


def network_state(checkpoint: Mapping[str, Any], which: str = "teacher") -> dict[str, Any]:
    """The state dict of one network (``backbone.*``, ``head.*``, ... or a bare backbone) inside
    any supported checkpoint layout, ``module.`` segments removed.

    ``which`` picks the teacher or the student of a training checkpoint (ours or DINO's); a
    file with a single network (a bare state dict, ``{"model": ...}``) ignores it.
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if isinstance(checkpoint.get("state_dict"), Mapping):  # mmengine (ours)
        state = _strip_module(checkpoint["state_dict"])
        picked = _select_segment(state, f"{which}.")
        if not _select_prefix(picked, "backbone."):
            if any(_select_segment(state, f"{w}.") for w in _WHICH):
                raise ValueError(f"checkpoint has no '{which}.backbone.*' weights")
            return state
        return picked
    if isinstance(checkpoint.get(which), Mapping):  # DINO / authors' training checkpoint
        return _strip_module(checkpoint[which])
    if any(isinstance(checkpoint.get(w), Mapping) for w in _WHICH):
        raise ValueError(f"DINO checkpoint without a '{which}' entry")
    if isinstance(checkpoint.get("model"), Mapping):  # timm / DeiT training checkpoint
        return _strip_module(checkpoint["model"])
    return _strip_module(checkpoint)


def _from_authors_layout(state: dict[str, Any]) -> dict[str, Any]:
    """The DenseDINO authors' backbone keys renamed to ours, in place; other layouts unchanged.

    Their ViT stores the CLS position apart (``cls_pos_embed`` [1, 1, D]) from the patch grid
    (``patch_pos_embed`` [1, N, D]) and adds both exactly where DINO adds ``pos_embed``; their
    learnable reference content ``ref_learn_token`` [1, 1, D] is our ``ref_token``.
    """
    if "patch_pos_embed" in state:
        if "cls_pos_embed" not in state or "cls_token" not in state:
            raise ValueError(
                "authors' checkpoint without a CLS token ('cls_pos_embed'/'cls_token'): models "
                "trained with --remove_global_token are not supported"
            )
        cls_pos, patch_pos = state.pop("cls_pos_embed"), state.pop("patch_pos_embed")
        state["pos_embed"] = torch.cat([cls_pos, patch_pos], dim=1)
    if "ref_learn_token" in state:
        state["ref_token"] = state.pop("ref_learn_token")
    return state


def extract_backbone_state(
    checkpoint: Mapping[str, Any], which: str = "teacher"
) -> dict[str, Tensor]:
    """The bare ViT state dict (our key names) inside any supported checkpoint layout."""
    state = _from_authors_layout(_backbone_part(network_state(checkpoint, which)))
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors or not state:
        raise ValueError(
            "unrecognised checkpoint layout: expected a ViT state dict, an mmengine checkpoint "
            f"('state_dict') or a DINO checkpoint ('teacher'/'student'); top-level keys: "
            f"{_few(checkpoint)}"
        )
    return state


def extract_head_states(
    checkpoint: Mapping[str, Any], which: str = "teacher"
) -> dict[str, dict[str, Tensor]]:
    """The DINO-style projection heads stored beside the backbone, by name.

    ``{"head": {...}}`` for a DINO checkpoint, also ``"ref_head"`` for ours (DenseDINO) and the
    authors'; keys relative to the head (``mlp.0.weight``, ``last_layer.weight_v``, ...). Only
    heads with a weight-normalised ``last_layer`` count, so a timm classifier ``head.weight``
    is not taken for one. Empty for a bare backbone.
    """
    state = network_state(checkpoint, which)
    heads: dict[str, dict[str, Tensor]] = {}
    for prefix in _HEAD_PREFIXES:
        head = _select_prefix(state, prefix)
        if "last_layer.weight_v" in head and all(isinstance(v, Tensor) for v in head.values()):
            heads[prefix[:-1]] = head
    return heads


def _few(keys: Any, n: int = 6) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


# ----------------------------------------------------------------------------- arch inference
def _infer_config(
    state: Mapping[str, Tensor], metadata: Mapping[str, str], arch: str | None
) -> dict[str, Any]:
    """VisionTransformer keyword arguments from the weights (and metadata when present)."""
    for key in ("pos_embed", "cls_token", "patch_embed.proj.weight"):
        if key not in state:
            raise ValueError(f"not a ViT state dict: no '{key}'; keys: {_few(state)}")
    embed_dim = int(state["pos_embed"].shape[-1])
    patch_size = int(state["patch_embed.proj.weight"].shape[-1])
    block_ids = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    depth = max(block_ids) + 1 if block_ids else 0
    inferred_arch = next((n for n, (d, _) in ARCHS.items() if d == embed_dim), None)
    meta_arch = metadata.get("arch") or None
    if arch is not None:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
        if ARCHS[arch][0] != embed_dim:
            found = f" ({inferred_arch})" if inferred_arch else ""
            raise ValueError(
                f"arch mismatch: {arch!r} has embed_dim {ARCHS[arch][0]} but the checkpoint has "
                f"embed_dim {embed_dim}{found}"
            )
        if meta_arch and meta_arch != arch:
            raise ValueError(f"arch mismatch: requested {arch!r}, the file says {meta_arch!r}")
    if "num_heads" in metadata:
        num_heads = int(metadata["num_heads"])
    elif (arch or inferred_arch) is not None:
        num_heads = ARCHS[arch or inferred_arch][1]  # type: ignore[index]
    else:
        raise ValueError(
            f"cannot infer the architecture: embed_dim {embed_dim} matches none of "
            f"{ {n: d for n, (d, _) in ARCHS.items()} } and the file has no 'num_heads' metadata"
        )
    config: dict[str, Any] = {
        "embed_dim": embed_dim,
        "num_heads": num_heads,
        "patch_size": patch_size,
        "depth": depth,
        "ref_content": "learnable" if "ref_token" in state else "zero",
        "ref_padding": metadata.get("ref_padding", "zeros"),
        # Files without the key predate it: they get DINO's interpolation, the default.
        "pos_interp": metadata.get("pos_interp", "dino"),
    }
    if "img_size" in metadata:
        config["img_size"] = int(metadata["img_size"])
    else:  # the grid it was trained at: loading never resamples the learned position grid
        side = math.isqrt(state["pos_embed"].shape[1] - 1)
        if side * side == state["pos_embed"].shape[1] - 1:
            config["img_size"] = side * patch_size
    for key in ("patch_size", "embed_dim", "depth"):
        if key in metadata and int(metadata[key]) != config[key]:
            raise ValueError(
                f"metadata says {key}={metadata[key]} but the weights have {config[key]}"
            )
    return config


def fit_pos_embed(state: dict[str, Tensor], model: VisionTransformer) -> None:
    """Resize a checkpoint's (square) position grid to the model's, bicubically, in place."""
    pos = state["pos_embed"]
    target = model.pos_embed.shape[1]
    if pos.shape[1] == target:
        return
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise ValueError(f"pos_embed of {pos.shape[1] - 1} patches is not a square grid")
    state["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=list(model.grid_size), old_size=[side, side], num_prefix_tokens=1
    )


def load_state_strict(model: VisionTransformer, state: Mapping[str, Tensor]) -> None:
    """``load_state_dict`` with errors that name the offending keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit the backbone: missing keys {_few(missing)}, "
            f"unexpected keys {_few(unexpected)}"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"shape mismatch (checkpoint vs model): {_few(wrong)}")
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------ public
def read_checkpoint_file(
    source: str | os.PathLike[str] | Mapping[str, Any],
) -> tuple[Mapping[str, Any], dict[str, str]]:
    """The whole (safely read) checkpoint mapping and its metadata (empty unless safetensors)."""
    if isinstance(source, Mapping):
        return source, {}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
        return state, metadata
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint, {}


def read_checkpoint(
    source: str | os.PathLike[str] | Mapping[str, Any], which: str = "teacher"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The bare backbone state dict and the metadata (empty unless safetensors) of a source."""
    checkpoint, metadata = read_checkpoint_file(source)
    return extract_backbone_state(checkpoint, which), metadata


def load_backbone(
    source: str | os.PathLike[str] | Mapping[str, Any],
    arch: str | None = None,
    *,
    which: str = "teacher",
    pos_interp: PosInterp | None = None,
) -> VisionTransformer:
    """Build a backbone from a checkpoint and return it in eval mode.

    ``arch`` (``vit_tiny``/``vit_small``/``vit_base``) is inferred from the weights when None
    and checked against them otherwise. ``which`` picks the teacher or the student of a
    training checkpoint. The model's ``img_size`` is the file's metadata or, without it, the
    size of the stored position grid (e.g. 384 for a 384-px timm model), so loading never
    resamples the learned grid; other input sizes are interpolated at run time, as DINO does
    (``pos_interp='dino'``, the default and what a file's metadata usually says) or as timm's
    ``dynamic_img_size`` does (``'timm'``); the argument overrides the file's choice.
    """
    state, metadata = read_checkpoint(source, which)
    config = _infer_config(state, metadata, arch)
    if pos_interp is not None:
        config["pos_interp"] = pos_interp
    with torch.device("meta"):  # skip the random init: every tensor is loaded below
        model = VisionTransformer(**config)
    model.to_empty(device="cpu")
    state = dict(state)
    fit_pos_embed(state, model)
    load_state_strict(model, state)
    return model.eval()


def backbone_metadata(model: VisionTransformer) -> dict[str, str]:
    """The architecture description stored in a safetensors header."""
    return {
        "format": FORMAT_TAG,
        "arch": arch_name(model) or "",
        "patch_size": str(model.patch_size),
        "embed_dim": str(model.embed_dim),
        "depth": str(model.depth),
        "num_heads": str(model.num_heads),
        "img_size": str(model.img_size),
        "ref_content": model.ref_content,
        "ref_padding": model.ref_padding,
        "pos_interp": model.pos_interp,
    }


def save_backbone(
    model: VisionTransformer,
    path: str | os.PathLike[str],
    metadata: Mapping[str, str | int | float] | None = None,
) -> Path:
    """Write the backbone's weights as safetensors with its architecture in the header.

    Keys are timm's: ``timm.create_model('vit_small_patch16_224', num_classes=0)
    .load_state_dict(safetensors.torch.load_file(path))`` works strictly (``num_classes=0``
    because no classifier ``head.*`` is stored). Only a model with ``ref_content='learnable'``
    also stores ``ref_token``, which timm does not know (load it with ``strict=False``).
    Extra ``metadata`` may not override the architecture keys.
    """
    header = backbone_metadata(model)
    for key, value in (metadata or {}).items():
        if key in _ARCH_KEYS and str(value) != header[key]:
            raise ValueError(f"metadata key {key!r} is reserved for the architecture")
        header[str(key)] = str(value)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=header)
    return path

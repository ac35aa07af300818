"""Fine-tuning from released weights: initialise a method's student and teacher from a file.

The DenseDINO paper (and Leopart) start from DINO's released weights; the authors' ``--finetune``
loads a DINO training checkpoint's ``student`` into the student and its ``teacher`` into the
teacher, splits ``pos_embed`` into their CLS and patch parts and copies the DINO head into the
reference head (``utils.load_full_ckpt``). :func:`init_from_checkpoint` does the same for every
format :func:`densedino.weights.load_backbone` reads:

- backbones: from the file's ``student`` / ``teacher`` entries when it has both (``which='both'``,
  the default), or both networks from one of them (``which='teacher'|'student'``); a file with a
  single network (a bare DINO/timm state dict, an exported backbone) initialises both. A position
  grid of another size is resampled to the model's;
- ``head``: from the file's DINO head (``head.mlp.*``, ``head.last_layer.weight_g/_v``) when it
  has one; ``ref_head``: from the file's ``ref_head`` (ours, the authors') or else from its DINO
  head (the paper's recipe); any other head, a head the file lacks, a learnable reference
  content the file lacks and the loss centers stay freshly initialised.

What was loaded and what stayed fresh is returned (:class:`InitReport`) and logged by
:class:`densedino.train.model.SSLModel` (config: ``model.init_from=PATH`` or
``model.init_from=dict(path=PATH, which='teacher')``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from densedino.models.vit import VisionTransformer
from densedino.weights import (
    extract_backbone_state,
    extract_head_states,
    fit_pos_embed,
    load_state_strict,
    network_state,
    read_checkpoint_file,
)

WHICH = ("both", "teacher", "student")


@dataclass
class InitReport:
    """Per network (``student``, ``teacher``): the parts loaded (with their source in the file)
    and the parts left as initialised."""

    source: str
    loaded: dict[str, list[str]] = field(default_factory=dict)
    fresh: dict[str, list[str]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per network (and one for the losses)."""
        out = [f"init_from {self.source}:"]
        for net in self.loaded:
            fresh = ", ".join(self.fresh.get(net, [])) or "nothing"
            out.append(f"  {net}: loaded {', '.join(self.loaded[net])}; fresh: {fresh}")
        out.append("  loss centers: fresh (zeros)")
        return out


def parse_init_from(init_from: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[str, str]:
    """``(path, which)`` from the config value: a path or ``dict(path=..., which=...)``."""
    if isinstance(init_from, Mapping):
        unknown = set(init_from) - {"path", "which"}
        if unknown or "path" not in init_from:
            raise ValueError(
                "init_from must be a path or dict(path=..., which=...), got keys "
                f"{sorted(init_from)}"
            )
        path, which = str(init_from["path"]), str(init_from.get("which", "both"))
    else:
        path, which = str(init_from), "both"
    if which not in WHICH:
        raise ValueError(f"init_from which must be one of {WHICH}, got {which!r}")
    return path, which


def _same_network(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when two network states are the same entry of the file (a single-network file)."""
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def _load_backbone(
    backbone: VisionTransformer, state: dict[str, Tensor], fresh: list[str]
) -> list[str]:
    """Copy ``state`` into ``backbone``; returns notes on what was adapted."""
    notes = []
    if "pos_embed" in state and state["pos_embed"].shape != backbone.pos_embed.shape:
        fit_pos_embed(state, backbone)
        notes.append("position grid resampled")
    if backbone.ref_token is not None and "ref_token" not in state:
        state["ref_token"] = backbone.ref_token.detach().clone()
        fresh.append("backbone.ref_token (the file has no learnable reference content)")
    elif backbone.ref_token is None and "ref_token" in state:
        del state["ref_token"]
        notes.append("its ref_token unused (model has ref_content='zero')")
    load_state_strict(backbone, state)
    return notes


def _head_shape(state: Mapping[str, Tensor]) -> str:
    out_dim, bottleneck = state["last_layer.weight_v"].shape
    return f"bottleneck {bottleneck}, out_dim {out_dim}"


def _load_head(head: nn.Module, name: str, source: str, state: Mapping[str, Tensor]) -> None:
    own = head.state_dict()
    wrong = [k for k in own if k not in state or state[k].shape != own[k].shape]
    extra = [k for k in state if k not in own]
    if wrong or extra:
        raise ValueError(
            f"init_from: the file's '{source}' ({_head_shape(state)}, keys {sorted(state)[:4]}...) "
            f"does not fit the model's '{name}' ({_head_shape(own)}); set the method's out_dim "
            f"and head=dict(hidden_dim=..., bottleneck_dim=..., nlayers=...) to the file's "
            f"(mismatched: {(wrong + extra)[:4]})"
        )
    head.load_state_dict(dict(state), strict=True)


def _init_network(
    network: nn.Module,
    net_name: str,
    checkpoint: Mapping[str, Any],
    entry: str,
    entry_label: str,
    report: InitReport,
) -> None:
    backbone = network.backbone
    if not isinstance(backbone, VisionTransformer):
        raise TypeError(f"init_from needs a VisionTransformer backbone, got {type(backbone)}")
    loaded: list[str] = []
    fresh: list[str] = []
    notes = _load_backbone(backbone, dict(extract_backbone_state(checkpoint, entry)), fresh)
    loaded.append(f"backbone <- {entry_label}" + (f" ({'; '.join(notes)})" if notes else ""))
    file_heads = extract_head_states(checkpoint, entry)
    for name, head in network.named_children():
        if name == "backbone":
            continue
        source = name if name in file_heads else None
        if source is None and name == "ref_head" and "head" in file_heads:
            source = "head"  # the paper's recipe: the reference head starts as the DINO head
        if source is None:
            fresh.append(name)
            continue
        _load_head(head, name, source, file_heads[source])
        loaded.append(f"{name} <- {entry_label} {source}")
    report.loaded[net_name] = loaded
    report.fresh[net_name] = fresh


def init_from_checkpoint(
    method: nn.Module, source: str | os.PathLike[str] | Mapping[str, Any], which: str = "both"
) -> InitReport:
    """Initialise ``method.student`` (and ``method.teacher`` if any) from a checkpoint.

    Args:
        method: an SSL method whose networks have a ``backbone`` and named heads.
        source: any file :func:`densedino.weights.load_backbone` reads (or such a mapping).
        which: ``both``: student from the file's student, teacher from its teacher (the
            authors' ``load_full_ckpt``); ``teacher`` / ``student``: both from that entry.
            Files with one network initialise both from it whatever ``which`` says.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    checkpoint, _ = read_checkpoint_file(source)
    label = source if isinstance(source, (str, os.PathLike)) else "<mapping>"
    report = InitReport(str(label))
    try:
        single = _same_network(
            network_state(checkpoint, "teacher"), network_state(checkpoint, "student")
        )
    except ValueError:  # only one of the two entries: which picks it, or the error says so
        single = False
    targets = [("student", method.student), ("teacher", getattr(method, "teacher", None))]
    for net_name, network in targets:
        if network is None:
            continue
        entry = net_name if which == "both" else which
        entry_label = "the file" if single else f"the file's {entry}"
        _init_network(network, net_name, checkpoint, entry, entry_label, report)
    return report

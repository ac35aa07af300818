"""Cross-check against the DenseDINO authors' own code: same weights, same inputs (issues 17, 21).

    python benchmarks/crosscheck_authors.py --authors-repo PATH [--dino-repo PATH]
        [--parts backbone step timing] [--threads 2] [--out crosscheck.json]

PATH is a checkout of github.com/yyk-wew/DenseDINO (and, optionally, of
github.com/facebookresearch/dino). Their code is imported from that path at run time and is
never part of this repository. Three parts:

backbone  Identical random weights in the authors' ``VisionTransformer`` (their
          ``cls_pos_embed``/``patch_pos_embed``/``ref_learn_token`` layout, mapped onto ours) and
          in ``densedino.models.vit``; CLS, patch and reference-token outputs for the same images
          and points (patch centres and random points) at each ``--sizes`` entry, with zero and
          with learnable reference content. With ``--dino-repo``, our CLS/patch outputs without
          reference tokens are also compared with DINO's own ``VisionTransformer``.
step      One DenseDINO training step: same student/teacher weights, views and reference points
          (from ``densedino.data.views.MultiViewTransform``) fed to both. The authors' side is
          their train loop without its data loader: ``MultiCropWrapper`` teacher on the 2 global
          views with ``tea_pos``, student on all views with ``stu_pos``, their ``DINOLoss``
          (``use_global_loss``, ``use_ref_loss``, mask ``all2pos_pos2cls_eye``); ours is
          ``DenseDINO.compute_losses``. Compares the loss, its two parts and the student
          gradients.
timing    The authors' step against ours (forward + loss + backward, then AdamW + EMA), ViT-S/16,
          8 images x 4 views of 224 px, K = 4 points per pair, out_dim 65536 by default; and the
          same for DINO (their code with the reference loss off against our ``DINO``). Steps of
          the four alternate; medians after one warm-up step each.

Points: our layout ``points[:, a, b]`` (K points of pair (a, b) in view a's frame) maps onto
theirs as ``tea_pos[iq][:, v] = points[:, iq, v]`` and ``stu_pos[v][:, iq] = points[:, v, iq]``.
Their layout also holds a slot for the pair of a view with itself, which no loss term uses and
which the attention mask keeps from every other token; it gets the view centre.

Adaptation to current torch: their ``DINOLoss.update_center`` all-reduces over
``torch.distributed``; the script runs one process and gives their module a stand-in that
leaves the sum as it is (world size 1). Nothing else of theirs is changed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import timm
import torch
from torch import Tensor, nn

from densedino.allocator import add_malloc_argument, set_malloc
from densedino.data.collate import collate_views
from densedino.data.view_config import ViewConfig
from densedino.data.views import MultiViewTransform
from densedino.methods.base import StepState
from densedino.methods.densedino import DenseDINO
from densedino.methods.dino import DINO
from densedino.models.vit import build_backbone

MASK_MODE = "all2pos_pos2cls_eye"  # the authors' README recipe: our reference mask
TEACHER_TEMP = 0.04
NUM_TEACHER = 2
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ their modules
class _SingleProcessDist:
    """Stand-in for ``torch.distributed`` in their ``main_dino``: one process, world size 1."""

    @staticmethod
    def all_reduce(tensor: Tensor, *args: object, **kwargs: object) -> None:
        """The sum over one process is the tensor itself."""

    @staticmethod
    def get_world_size(*args: object) -> int:
        return 1


def _load_modules(repo: Path, names: Iterable[str]) -> dict[str, ModuleType]:
    """Import ``repo/<name>.py`` in order under their own names, then take the names back out
    of ``sys.modules`` so that two checkouts (authors', DINO's) with equal module names can be
    loaded side by side."""
    names = list(names)
    saved = {name: sys.modules.pop(name, None) for name in names}
    loaded: dict[str, ModuleType] = {}
    try:
        for name in names:
            path = repo / f"{name}.py"
            if not path.is_file():
                raise SystemExit(f"{path} not found: is {repo} a checkout of the right repository?")
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        for name in names:
            sys.modules.pop(name, None)
            if saved[name] is not None:
                sys.modules[name] = saved[name]
    return loaded


def load_authors(repo: Path) -> SimpleNamespace:
    """The authors' ``utils``, ``vision_transformer`` and ``main_dino`` modules."""
    mods = _load_modules(repo, ["utils", "vision_transformer", "main_dino"])
    mods["main_dino"].dist = _SingleProcessDist()
    return SimpleNamespace(
        utils=mods["utils"], vits=mods["vision_transformer"], main=mods["main_dino"]
    )


def load_dino(repo: Path) -> ModuleType:
    """DINO's ``vision_transformer`` module."""
    return _load_modules(repo, ["utils", "vision_transformer"])["vision_transformer"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------- weight layout
def authors_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map the authors' key layout onto ours (timm's), under any prefix.

    ``cls_pos_embed`` [1, 1, D] and ``patch_pos_embed`` [1, N, D] become ``pos_embed``
    [1, 1 + N, D]; ``ref_learn_token`` becomes ``ref_token``; every other key is the same.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("cls_pos_embed"):
            continue
        if key.endswith("patch_pos_embed"):
            prefix = key[: -len("patch_pos_embed")]
            out[prefix + "pos_embed"] = torch.cat([state[prefix + "cls_pos_embed"], value], 1)
        elif key.endswith("ref_learn_token"):
            out[key[: -len("ref_learn_token")] + "ref_token"] = value
        else:
            out[key] = value
    return out


def authors_grads(module: nn.Module) -> dict[str, Tensor]:
    """The authors' student gradients in our key layout (zeros where a gradient is None)."""
    grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p))
        for name, p in module.named_parameters()
        if p.requires_grad
    }
    return authors_to_ours(grads)


# ------------------------------------------------------------------------------------ metrics
def max_abs(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def grad_diffs(ours: nn.Module, theirs: dict[str, Tensor]) -> dict[str, Any]:
    """Relative gradient differences: worst parameter (max |diff| / max |theirs|) and global
    (||diff|| / ||theirs|| over all parameters)."""
    worst, worst_name, diff_sq, ref_sq = 0.0, "", 0.0, 0.0
    names = []
    for name, param in ours.named_parameters():
        if not param.requires_grad:
            continue
        names.append(name)
        if name not in theirs:
            raise KeyError(f"the authors' student has no parameter matching {name!r}")
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        ref = theirs[name].double()
        diff = grad.double() - ref
        scale = ref.abs().max().item()
        rel = diff.abs().max().item() / scale if scale > 0 else diff.abs().max().item()
        if rel > worst:
            worst, worst_name = rel, name
        diff_sq += diff.square().sum().item()
        ref_sq += ref.square().sum().item()
    missing = sorted(set(theirs) - set(names))
    if missing:
        raise KeyError(f"parameters of the authors' student without a match: {missing}")
    return {
        "grad_rel_max": worst,
        "grad_rel_max_param": worst_name,
        "grad_rel_global": math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.sqrt(diff_sq),
        "num_params": len(names),
    }


# ----------------------------------------------------------------------------------- backbone
def parse_size(text: str) -> tuple[int, int]:
    """``224`` -> (224, 224); ``224x160`` -> (H=224, W=160)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}")
    h = int(parts[0])
    return h, int(parts[-1])


def probe_points(
    batch: int, grid: tuple[int, int], num_random: int, gen: torch.Generator
) -> Tensor:
    """Points [B, M, 2] (x, y in [-1, 1]): four patch centres of the view's grid (corners and
    middle, where a point sample of the native grid and the resized grid differ most), then
    ``num_random`` uniform points."""
    gh, gw = grid
    cells = [(0, 0), (gh - 1, gw - 1), (gh // 2, gw // 3), (gh // 3, gw - 1)]
    centres = torch.tensor([[(2 * j + 1) / gw - 1, (2 * i + 1) / gh - 1] for i, j in cells])
    rand = torch.rand(batch, num_random, 2, generator=gen) * 2 - 1
    return torch.cat([centres.expand(batch, -1, -1), rand], dim=1)


def backbone_rows(
    authors: SimpleNamespace, dino_vits: ModuleType | None, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Part 1: outputs of the two backbones (and DINO's) on the same weights and inputs."""
    rows: list[dict[str, Any]] = []
    for content in ("zero", "learnable"):
        torch.manual_seed(args.seed)
        theirs = getattr(authors.vits, args.arch)(
            patch_size=args.patch_size, with_learnable_token=content == "learnable"
        ).eval()
        ours = build_backbone(args.arch, args.patch_size, ref_content=content).eval()
        ours.load_state_dict(authors_to_ours(theirs.state_dict()), strict=True)
        dino = None
        if dino_vits is not None and content == "zero":
            dino = getattr(dino_vits, args.arch)(patch_size=args.patch_size).eval()
            dino.load_state_dict(ours.state_dict(), strict=True)
        gen = torch.Generator().manual_seed(args.seed)
        for h, w in args.sizes:
            images = torch.randn(args.batch, 3, h, w, generator=gen)
            grid = (h // args.patch_size, w // args.patch_size)
            points = probe_points(args.batch, grid, 4, gen)
            num_refs = points.shape[1]
            with torch.no_grad():
                seq = theirs.get_intermediate_layers(images, points[:, None], MASK_MODE, n=1)[0]
                mine = ours.forward_features(images, ref_points=points)
                plain = ours.forward_features(images)
                row: dict[str, Any] = {
                    "size": f"{h}x{w}",
                    "ref_content": content,
                    "cls": max_abs(mine["cls"], seq[:, 0]),
                    "patch": max_abs(mine["patch"].flatten(1, 2), seq[:, 1 + num_refs :]),
                    "ref": max_abs(mine["ref"], seq[:, 1 : 1 + num_refs]),
                    # ours with and without reference tokens: the mask keeps them apart
                    "ours_refs_vs_none": max(
                        max_abs(mine["cls"], plain["cls"]), max_abs(mine["patch"], plain["patch"])
                    ),
                }
                if dino is not None:
                    out = dino.get_intermediate_layers(images, n=1)[0]
                    row["dino_cls"] = max_abs(plain["cls"], out[:, 0])
                    row["dino_patch"] = max_abs(plain["patch"].flatten(1, 2), out[:, 1:])
            worst = max(row["cls"], row["patch"], row["ref"])
            row["ok"] = worst <= args.tol
            rows.append(row)
            print_progress(f"backbone {row['size']:>8s} {content:9s} max diff {worst:.2e}")
    return rows


# --------------------------------------------------------------------------------------- step
def make_batch(cfg: ViewConfig, batch: int, seed: int) -> dict[str, Any]:
    """Views and reference points of ``batch`` random images from our transform."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 288, 352), dtype=torch.uint8, generator=gen)
    return collate_views([MultiViewTransform(cfg)(img, generator=gen) for img in images])


def authors_points(points: Tensor, num_teacher: int = NUM_TEACHER) -> tuple[list, list]:
    """Our points [B, V, V, K, 2] as their ``tea_pos`` (T x [B, V, K, 2]) and ``stu_pos``
    (V x [B, T, K, 2]); NaN slots (a view with itself, pairs without a teacher view) get the
    view centre: no loss term reads them and the mask keeps them from every other token."""
    filled = torch.nan_to_num(points, nan=0.0)
    tea_pos = [filled[:, iq].contiguous() for iq in range(num_teacher)]
    stu_pos = [filled[:, v, :num_teacher].contiguous() for v in range(points.shape[1])]
    return tea_pos, stu_pos


def build_authors_networks(
    authors: SimpleNamespace, args: argparse.Namespace, drop_path_rate: float, ref_head: bool
) -> tuple[nn.Module, nn.Module]:
    """Student and teacher as their ``train_dino`` builds them (teacher = student's weights)."""
    vits, wrapper = authors.vits, authors.utils.MultiCropWrapper
    make = getattr(vits, args.arch)
    s_bb = make(patch_size=args.patch_size, drop_path_rate=drop_path_rate)
    t_bb = make(patch_size=args.patch_size)
    dim = s_bb.embed_dim

    def head(**kw: Any) -> nn.Module | None:
        return vits.DINOHead(dim, args.out_dim, use_bn=False, **kw)

    student = wrapper(
        s_bb, head(norm_last_layer=True), head(norm_last_layer=True) if ref_head else None
    )
    teacher = wrapper(t_bb, head(), head() if ref_head else None)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student.train(), teacher.train()


def authors_loss(
    authors: SimpleNamespace, out_dim: int, num_views: int, cls_all: bool, ref: bool, ref_all: bool
) -> nn.Module:
    """Their ``DINOLoss`` for one epoch at teacher temperature 0.04 (no warm-up)."""
    return authors.main.DINOLoss(
        out_dim,
        num_views,
        TEACHER_TEMP,
        TEACHER_TEMP,
        0,
        1,
        use_global_loss=True,
        use_ref_loss=ref,
        use_all_crop_global=cls_all,
        use_all_crop_ref=ref_all,
    )


def authors_forward_loss(
    student: nn.Module,
    teacher: nn.Module,
    loss_fn: nn.Module,
    views: list[Tensor],
    pos: tuple[list, list] | None,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Their train loop's forward and loss call (main_dino.py ``train_one_epoch``)."""
    tea_pos, stu_pos = pos if pos is not None else (None, None)
    teacher_output = teacher(views[:NUM_TEACHER], tea_pos, MASK_MODE)
    student_output = student(views, stu_pos, MASK_MODE)
    return loss_fn(student_output, teacher_output, 0, alpha)


def step_case(
    authors: SimpleNamespace, args: argparse.Namespace, local_size: int, cls_pairs: str
) -> dict[str, Any]:
    """Part 2: one DenseDINO step through both codes (2 global 224 px views + 4 more)."""
    cfg = ViewConfig(
        num_global=2,
        global_size=224,
        global_scale=(0.25, 1.0),
        num_local=4,
        local_size=local_size,
        local_scale=(0.25, 1.0) if local_size == 224 else (0.05, 0.4),
        num_teacher=NUM_TEACHER,
        num_points=args.points,
    )
    batch = make_batch(cfg, args.batch, args.seed)
    views = batch["views"]
    torch.manual_seed(args.seed)
    student, teacher = build_authors_networks(authors, args, 0.0, ref_head=True)
    loss_fn = authors_loss(authors, args.out_dim, len(views), cls_pairs == "all", True, True)
    loss, loss_cls, loss_ref = authors_forward_loss(
        student, teacher, loss_fn, views, authors_points(batch["points"]), args.alpha
    )
    loss.backward()
    theirs = authors_grads(student)

    method = DenseDINO(
        arch=args.arch,
        patch_size=args.patch_size,
        out_dim=args.out_dim,
        drop_path_rate=0.0,
        cls_pairs=cls_pairs,
        ref_pairs="all",
        alpha=args.alpha,
    )
    method.student.load_state_dict(authors_to_ours(student.state_dict()), strict=True)
    method.teacher.load_state_dict(authors_to_ours(teacher.state_dict()), strict=True)
    method.train()
    out = method.compute_losses(batch, StepState(teacher_temp=TEACHER_TEMP))
    out["loss"].backward()

    row: dict[str, Any] = {
        "views": f"2x224 + 4x{local_size}",
        "points_per_pair": args.points,
        "cls_pairs": cls_pairs,
        "ref_pairs": "all",
        "loss_ours": out["loss"].item(),
        "loss_theirs": loss.item(),
        "loss_rel": abs(out["loss"].item() - loss.item()) / abs(loss.item()),
        "loss_cls_abs": abs(out["loss_cls"].item() - loss_cls.item()),
        "loss_ref_abs": abs(out["loss_ref"].item() - loss_ref.item()),
        **grad_diffs(method.student, theirs),
    }
    row["ok"] = row["loss_rel"] <= args.tol and row["grad_rel_max"] <= args.tol
    print_progress(
        f"step {row['views']} cls_pairs={cls_pairs}: loss rel {row['loss_rel']:.2e}, "
        f"grad rel {row['grad_rel_max']:.2e}"
    )
    return row


# ------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Callable[[], None]]) -> tuple[float, float, float]:
    """Run ``fn`` (forward + backward; returns the update to run next): wall seconds of both
    and CPU seconds of the whole step (all threads; on a crowded machine the wall time mostly
    measures waiting, the CPU time the work)."""
    cpu = time.process_time()
    start = time.perf_counter()
    update = fn()
    mid = time.perf_counter()
    update()
    return mid - start, time.perf_counter() - mid, time.process_time() - cpu


def timing(authors: SimpleNamespace, args: argparse.Namespace) -> dict[str, Any]:
    """Part 3: alternating training steps of the four (ours/theirs x DenseDINO/DINO)."""
    cfg = ViewConfig(
        num_global=4, global_size=224, num_teacher=NUM_TEACHER, num_points=args.timing_points
    )
    batch = make_batch(cfg, args.timing_batch, args.seed)
    views, num_views = batch["views"], len(batch["views"])
    pos = authors_points(batch["points"])
    momentum = 0.996

    torch.manual_seed(args.seed)
    student, teacher = build_authors_networks(authors, args, 0.1, ref_head=True)
    wrapper = authors.utils.MultiCropWrapper
    # Their DINO run builds the wrapper without a reference head; it shares the modules here.
    student_dino = wrapper(student.backbone, student.head, None)
    teacher_dino = wrapper(teacher.backbone, teacher.head, None)
    their_losses = {
        "DenseDINO": authors_loss(authors, args.out_dim, num_views, True, True, True),
        "DINO": authors_loss(authors, args.out_dim, num_views, True, False, True),
    }
    ours = {
        "DenseDINO": DenseDINO(arch=args.arch, patch_size=args.patch_size, out_dim=args.out_dim),
        "DINO": DINO(arch=args.arch, patch_size=args.patch_size, out_dim=args.out_dim),
    }
    state = authors_to_ours(student.state_dict())
    for method in ours.values():
        keys = method.student.state_dict().keys()
        method.student.load_state_dict({k: state[k] for k in keys}, strict=True)
        method.teacher.load_state_dict({k: state[k] for k in keys}, strict=True)
        method.train()

    def adamw(module: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
        """Theirs as main_dino.py builds it; ours fused, as our trainer's config builds it."""
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-4, fused=fused)

    def their_step(s: nn.Module, t: nn.Module, name: str, opt: torch.optim.Optimizer):
        def run() -> Callable[[], None]:
            loss, _, _ = authors_forward_loss(
                s, t, their_losses[name], views, pos if name == "DenseDINO" else None, args.alpha
            )
            loss.backward()

            def update() -> None:
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():  # their EMA loop (main_dino.py)
                    for q, k in zip(s.parameters(), t.parameters(), strict=True):
                        k.data.mul_(momentum).add_((1 - momentum) * q.detach().data)

            return update

        return run

    def our_step(method: DINO, opt: torch.optim.Optimizer):
        def run() -> Callable[[], None]:
            method.compute_losses(batch, StepState(teacher_temp=TEACHER_TEMP))["loss"].backward()

            def update() -> None:
                opt.step()
                opt.zero_grad(set_to_none=True)
                method.update_teacher(momentum)

            return update

        return run

    steps = {
        "ours DenseDINO": our_step(ours["DenseDINO"], adamw(ours["DenseDINO"].student, fused=True)),
        "theirs DenseDINO": their_step(student, teacher, "DenseDINO", adamw(student)),
        "ours DINO": our_step(ours["DINO"], adamw(ours["DINO"].student, fused=True)),
        "theirs DINO": their_step(student_dino, teacher_dino, "DINO", adamw(student_dino)),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    started = time.perf_counter()
    rounds = 0
    for i in range(args.timing_steps + 1):
        if i > 1 and time.perf_counter() - started > args.timing_budget_s:
            print_progress(f"timing budget of {args.timing_budget_s:.0f} s spent: stopping")
            break
        for name, fn in steps.items():
            fwd_bwd, update, cpu = timed(fn)
            if i > 0:  # the first step of each warms up allocators
                times[name].append((fwd_bwd, update, cpu))
            print_progress(
                f"timing step {i}/{args.timing_steps} {name:16s} fwd+bwd {fwd_bwd:6.2f} s, "
                f"update {update:5.2f} s, CPU {cpu:6.2f} s{'' if i else ' (warm-up)'}"
            )
        rounds = i
    medians = {
        name: {
            "fwd_bwd_s": statistics.median(t[0] for t in values),
            "step_s": statistics.median(t[0] + t[1] for t in values),
            "steps_s": [round(t[0] + t[1], 3) for t in values],
            "cpu_s": statistics.median(t[2] for t in values),
        }
        for name, values in times.items()
    }

    def ratio(a: str, b: str, key: str = "step_s") -> float:
        return medians[a][key] / medians[b][key]

    return {
        "setting": (
            f"{args.arch}/{args.patch_size}, {args.timing_batch} images x 4 views of 224 px, "
            f"2 teacher views, K = {args.timing_points}, out_dim {args.out_dim}, CLS and "
            f"reference loss on all pairs, {torch.get_num_threads()} threads, median of "
            f"{rounds} alternating steps"
        ),
        "complete": rounds == args.timing_steps,
        "medians": medians,
        "ratios": {
            "ours/theirs DenseDINO": ratio("ours DenseDINO", "theirs DenseDINO"),
            "ours/theirs DINO": ratio("ours DINO", "theirs DINO"),
            "ours DenseDINO/DINO": ratio("ours DenseDINO", "ours DINO"),
            "theirs DenseDINO/DINO": ratio("theirs DenseDINO", "theirs DINO"),
            "ours/theirs DenseDINO fwd+bwd": ratio(
                "ours DenseDINO", "theirs DenseDINO", "fwd_bwd_s"
            ),
            "ours/theirs DINO fwd+bwd": ratio("ours DINO", "theirs DINO", "fwd_bwd_s"),
            "ours/theirs DenseDINO CPU": ratio("ours DenseDINO", "theirs DenseDINO", "cpu_s"),
            "ours/theirs DINO CPU": ratio("ours DINO", "theirs DINO", "cpu_s"),
            "ours DenseDINO/DINO CPU": ratio("ours DenseDINO", "ours DINO", "cpu_s"),
            "theirs DenseDINO/DINO CPU": ratio("theirs DenseDINO", "theirs DINO", "cpu_s"),
        },
        "wall_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------- output
def print_progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Markdown table of ``rows`` with (key, header) columns; floats in short scientific form."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "NO"
        if isinstance(value, float):
            return f"{value:.2e}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO_ROOT), *cmd], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    env = {
        "densedino_commit": git("rev-parse", "--short", "HEAD"),
        "densedino_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "malloc": args.malloc,
        # our position interpolation at a non-native grid (the option exists since a24d05a)
        "pos_interp_default": getattr(
            build_backbone("vit_tiny", depth=1), "pos_interp", "timm (no option)"
        ),
        "authors_files_sha256_16": {
            f: _sha256(args.authors_repo / f)
            for f in ("vision_transformer.py", "main_dino.py", "utils.py")
        },
    }
    if args.dino_repo is not None:
        env["dino_vision_transformer_sha256_16"] = _sha256(args.dino_repo / "vision_transformer.py")
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--authors-repo",
        type=Path,
        required=True,
        help="checkout of github.com/yyk-wew/DenseDINO (never committed here)",
    )
    parser.add_argument(
        "--dino-repo",
        type=Path,
        default=None,
        help="optional checkout of github.com/facebookresearch/dino: also compare "
        "CLS/patch outputs with DINO's own ViT",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["backbone", "step", "timing"],
        default=["backbone", "step", "timing"],
    )
    parser.add_argument(
        "--arch", default="vit_small", choices=["vit_tiny", "vit_small", "vit_base"]
    )
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--out-dim", type=int, default=65536, help="head prototypes (all parts)")
    parser.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        default=[parse_size(s) for s in ("224", "96", "160", "288", "224x160")],
        help="backbone part: view sizes, N or HxW (default 224 96 160 288 224x160)",
    )
    parser.add_argument(
        "--local-sizes",
        type=int,
        nargs="+",
        default=[224, 96, 64],
        help="step part: size of the 4 non-teacher views (default 224 96 64)",
    )
    parser.add_argument("--batch", type=int, default=2, help="images in the backbone/step parts")
    parser.add_argument(
        "--points",
        type=int,
        default=2,
        help="step part: random points per pair (authors' --num_reference 2)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="CLS loss weight")
    parser.add_argument("--timing-batch", type=int, default=8)
    parser.add_argument("--timing-points", type=int, default=4, help="K of the timing part")
    parser.add_argument(
        "--timing-steps", type=int, default=5, help="timed steps of each (+1 warm-up)"
    )
    parser.add_argument(
        "--timing-budget-s",
        type=float,
        default=900.0,
        help="timing part: start no new round of steps after this many seconds (at least one "
        "timed round always runs; the JSON says whether all --timing-steps ran)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    add_malloc_argument(parser)
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="agreement bound (issue 17): max abs diff of outputs, relative diff "
        "of the loss and of the gradients",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_malloc(args.malloc)
    authors = load_authors(args.authors_repo)
    dino_vits = load_dino(args.dino_repo) if args.dino_repo is not None else None
    result: dict[str, Any] = {"environment": environment(args), "tol": args.tol}
    print(
        f"densedino {result['environment']['densedino_commit']} (pos_interp "
        f"{result['environment']['pos_interp_default']}), torch {torch.__version__}, "
        f"timm {timm.__version__}, {args.arch}/{args.patch_size}, out_dim {args.out_dim}, "
        f"{torch.get_num_threads()} threads, malloc {args.malloc}"
    )

    if "backbone" in args.parts:
        rows = backbone_rows(authors, dino_vits, args)
        result["backbone"] = rows
        columns = [
            ("size", "size (HxW)"),
            ("ref_content", "ref content"),
            ("cls", "CLS"),
            ("patch", "patch"),
            ("ref", "ref"),
            ("ours_refs_vs_none", "ours: refs vs none"),
        ]
        if dino_vits is not None:
            columns += [("dino_cls", "vs DINO: CLS"), ("dino_patch", "vs DINO: patch")]
        columns.append(("ok", f"<= {args.tol:g}"))
        print(
            f"\nBackbone outputs, ours vs the authors' (max abs diff, batch {args.batch}, "
            f"4 patch-centre + 4 random points):"
        )
        print(table(rows, columns))
    if "step" in args.parts:
        rows = [
            step_case(authors, args, size, cls_pairs)
            for size in args.local_sizes
            for cls_pairs in ("global", "all")
        ]
        result["step"] = rows
        print(
            f"\nOne DenseDINO training step, ours vs the authors' (batch {args.batch}, "
            f"K = {args.points}, alpha {args.alpha}, reference loss on all pairs):"
        )
        print(
            table(
                rows,
                [
                    ("views", "views"),
                    ("cls_pairs", "CLS pairs"),
                    ("loss_theirs", "loss (theirs)"),
                    ("loss_rel", "loss rel diff"),
                    ("loss_cls_abs", "CLS part abs"),
                    ("loss_ref_abs", "ref part abs"),
                    ("grad_rel_max", "grad rel (worst param)"),
                    ("grad_rel_max_param", "worst param"),
                    ("grad_rel_global", "grad rel (global)"),
                    ("ok", f"<= {args.tol:g}"),
                ],
            )
        )
    if "timing" in args.parts:
        result["timing"] = timing(authors, args)
        t = result["timing"]
        note = "" if t["complete"] else f" (stopped by --timing-budget-s {args.timing_budget_s:g})"
        print(f"\nTraining step time, {t['setting']}{note}:")
        rows = [
            {
                "name": k,
                "fwd_bwd": f"{v['fwd_bwd_s']:.3f}",
                "step": f"{v['step_s']:.3f}",
                "steps": ", ".join(f"{s:.2f}" for s in v["steps_s"]),
                "cpu": f"{v['cpu_s']:.3f}",
            }
            for k, v in t["medians"].items()
        ]
        print(
            table(
                rows,
                [
                    ("name", "step"),
                    ("fwd_bwd", "fwd+bwd s (median)"),
                    ("step", "step s (median)"),
                    ("steps", "steps s"),
                    ("cpu", "CPU s (median)"),
                ],
            )
        )
        for name, value in t["ratios"].items():
            print(f"  {name:32s} {value:.3f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""DenseDINO's training step against DINO's on the same views: FLOPs, time and peak memory.

    .venv/bin/python benchmarks/bench_train_step.py                      # both settings, CPU
    .venv/bin/python benchmarks/bench_train_step.py --setting paper --steps 7 --json out.json
    .venv/bin/python benchmarks/bench_train_step.py --amp bf16           # bf16 autocast
    .venv/bin/python benchmarks/bench_train_step.py --amp both --no-memory  # fp32 vs bf16
    .venv/bin/python benchmarks/bench_train_step.py --device cuda --amp bf16

Settings (batch 8 unless ``--batch``):

- ``paper``: ViT-S/16, 4 views of 224 px (2 teacher views), K = 4 random points per pair,
  out_dim 65536, CLS and reference losses on every (teacher, other view) pair;
- ``authors``: the authors' recipe (``configs/densedino/densedino_vit-t16_authors_100e.py``):
  ViT-T/16, 2 teacher views + 4 more, all 224 px (``ViewConfig.authors()``), CLS loss on the
  global pair only, reference loss on all pairs, out_dim 65536.

DINO runs the same method arguments without the reference tokens (same views, same pairs for its
CLS loss: in the authors' recipe, DINO's student then sees the 2 global views only, as the CLS
loss uses no other); ``--dino-pairs all`` gives DINO the CLS loss on every (teacher, other view)
pair instead, i.e. DINO's own use of the same 6 views. For each setting, in one run:

- FLOPs of one forward + backward of each (``torch.utils.flop_counter.FlopCounterMode``) and
  their ratio: the arithmetic the method adds;
- seconds per training step, the trainer's own (:func:`densedino.train.model.ssl_train_step`:
  uint8 views normalised on the device, forward, backward, per-parameter clipping, AdamW, teacher
  EMA, logged values), steps alternating between the two methods so that a change in machine
  load hits both; the first ``--warmup`` steps of each (3) are untimed; medians and their
  ratio, of wall time and of the process's CPU time (which other jobs on a shared machine do
  not inflate; with ``--threads 1`` the cleanest measure);
- peak memory of a step above the built model and optimizer, each method in its own process:
  peak RSS (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the RSS before
  the steps on CPU, ``torch.cuda.max_memory_allocated`` minus the allocated memory before the
  steps on CUDA; two steps, so the optimizer state is included.

``--amp both`` alternates the two methods in float32 and under bf16 autocast in the same run
(memory: float32 only), which says whether bf16 helps on this machine.

Prints a table and, with ``--json``, writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from mmengine.optim import OptimWrapper
from torch.utils.flop_counter import FlopCounterMode

from densedino.allocator import add_malloc_argument, set_malloc
from densedino.data.collate import collate_views, normalize_views
from densedino.data.view_config import ViewConfig
from densedino.data.views import MultiViewTransform
from densedino.methods.base import StepState
from densedino.train.model import SSLModel
from densedino.train.optim import dino_param_groups

METHODS = ("DINO", "DenseDINO")
# DenseDINO-only arguments, dropped for DINO.
DENSE_ONLY = ("alpha", "ref_pairs", "ref_out_dim", "ref_content")


def setting(name: str) -> tuple[dict, ViewConfig]:
    """DenseDINO's method arguments and the views of a named setting."""
    if name == "paper":
        method = dict(arch="vit_small", cls_pairs="all", ref_pairs="all")
        views = ViewConfig.paper()
    elif name == "authors":
        method = dict(arch="vit_tiny", cls_pairs="global", ref_pairs="all")
        views = ViewConfig.authors()
    else:
        raise ValueError(f"unknown setting {name!r}; choose paper or authors")
    common = dict(patch_size=16, out_dim=65536, drop_path_rate=0.1, alpha=0.5)
    return {**common, **method}, views


def method_config(name: str, method: str, dino_pairs: str = "same") -> dict:
    kwargs, _ = setting(name)
    if method == "DINO":
        kwargs = {k: v for k, v in kwargs.items() if k not in DENSE_ONLY}
        if dino_pairs == "all":
            kwargs["cls_pairs"] = "all"
    return dict(type=method, **kwargs)


def make_batch(views: ViewConfig, batch: int) -> dict:
    """uint8 views of random images, as the training data loader gives them."""
    transform = MultiViewTransform(views, dtype="uint8")
    generator = torch.Generator().manual_seed(0)
    size = max(views.view_sizes)
    images = torch.randint(
        0, 256, (batch, 3, size + 32, size + 64), dtype=torch.uint8, generator=generator
    )
    return collate_views([transform(img, generator=generator) for img in images])


def autocast(device: str, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


def build(name: str, method: str, args) -> tuple[SSLModel, OptimWrapper]:
    torch.manual_seed(0)
    model = SSLModel(method=method_config(name, method, args.dino_pairs)).to(args.device)
    # Epoch 1: the heads' last layers train, as in all but the first epoch.
    model.state = StepState(epoch=1)
    # fused, as configs/_base_/default_runtime.py has the trainer build it
    optimizer = torch.optim.AdamW(dino_param_groups(model.method.student), lr=1e-5, fused=True)
    return model, OptimWrapper(optimizer)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_seconds(
    model: SSLModel, wrapper: OptimWrapper, batch: dict, args, amp: str
) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of one training step."""
    synchronize(args.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with autocast(args.device, amp):
        model.train_step(dict(batch), wrapper)
    synchronize(args.device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def count_flops(model: SSLModel, batch: dict, args) -> int:
    """FLOPs of one forward + backward of the method's losses."""
    data = normalize_views(model.data_preprocessor(dict(batch), True))
    with FlopCounterMode(display=False) as counter:
        loss = model.method.compute_losses(data, StepState())["loss"]
        loss.backward()
    model.method.student.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def amp_modes(args) -> list[str]:
    return ["none", "bf16"] if args.amp == "both" else [args.amp]


def compare(name: str, args) -> dict:
    """FLOPs and step times of both methods (under each amp mode) for one setting."""
    _, views = setting(name)
    batch = make_batch(views, args.batch)
    built = {m: build(name, m, args) for m in METHODS}
    flops = {m: count_flops(built[m][0], batch, args) for m in METHODS}
    runs = [(amp, m) for amp in amp_modes(args) for m in METHODS]
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    cpu: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for i in range(args.warmup + args.steps):
        for amp, m in runs:
            seconds, cpu_seconds = step_seconds(*built[m], batch, args, amp)
            if i >= args.warmup:
                times[amp, m].append(seconds)
                cpu[amp, m].append(cpu_seconds)
    per_amp = {}
    for amp in amp_modes(args):
        medians = {m: statistics.median(times[amp, m]) for m in METHODS}
        cpu_medians = {m: statistics.median(cpu[amp, m]) for m in METHODS}
        per_amp[amp] = {
            "seconds": {m: times[amp, m] for m in METHODS},
            "median_s": medians,
            "step_ratio": medians["DenseDINO"] / medians["DINO"],
            # CPU time is what a step costs whatever else the machine runs: on a shared host the
            # wall time of one step varied 3x while its CPU time did not.
            "cpu_seconds": {m: cpu[amp, m] for m in METHODS},
            "median_cpu_s": cpu_medians,
            "cpu_ratio": cpu_medians["DenseDINO"] / cpu_medians["DINO"],
        }
    return {
        "setting": name,
        "views": views.num_views,
        "teacher_views": views.num_teacher,
        "points_per_pair": views.points_per_pair,
        "view_sizes": list(views.view_sizes),
        "gflop": {m: flops[m] / 1e9 for m in METHODS},
        "flop_ratio": flops["DenseDINO"] / flops["DINO"],
        "dino_cls_pairs": method_config(name, "DINO", args.dino_pairs)["cls_pairs"],
        "amp": per_amp,
    }


def rss_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, method: str, args) -> dict:
    """Peak memory of two steps above the built model and optimizer (run in its own process)."""
    _, views = setting(name)
    batch = make_batch(views, args.batch)
    model, wrapper = build(name, method, args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
        for _ in range(2):
            step_seconds(model, wrapper, batch, args, args.amp)
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"kind": "cuda max_memory_allocated", "built_mib": base, "peak_mib": peak}
    base = rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    for _ in range(2):
        step_seconds(model, wrapper, batch, args, args.amp)
    return {"kind": "cpu peak RSS", "built_mib": base, "peak_mib": rss_mib("VmHWM")}


def memory(name: str, args) -> dict:
    """Peak memory per method, one fresh process each."""
    out = {}
    for method in METHODS:
        command = [sys.executable, __file__, "--memory-child", method, "--setting", name]
        command += ["--device", args.device, "--amp", amp_modes(args)[0]]
        command += ["--batch", str(args.batch), "--dino-pairs", args.dino_pairs]
        command += ["--malloc", args.malloc]
        if args.threads:
            command += ["--threads", str(args.threads)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run of {method} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["above_mib"] = result["peak_mib"] - result["built_mib"]
        out[method] = result
    out["ratio"] = out["DenseDINO"]["above_mib"] / out["DINO"]["above_mib"]
    return out


def print_table(result: dict, args) -> None:
    gflop = result["gflop"]
    print(
        f"\n{result['setting']}: batch {args.batch}, views {result['view_sizes']} "
        f"({result['teacher_views']} teacher), {result['points_per_pair']} points per pair, "
        f"DINO cls_pairs={result['dino_cls_pairs']}, "
        f"device {args.device}, {torch.get_num_threads()} threads, malloc {args.malloc}, "
        f"median of {args.steps} alternating steps"
    )
    memory = result.get("memory", {})
    head = f"{'GFLOP f+b':>10s} {'s/step':>8s} {'CPU s':>8s} {'peak MiB':>9s}"
    print(f"  {'':16s} {head}   steps (s)")
    for amp, timing in result["amp"].items():
        for m in METHODS:
            mem = (
                memory.get(m, {}).get("above_mib", float("nan"))
                if amp == args.memory_amp
                else float("nan")
            )
            steps = " ".join(f"{s:.2f}" for s in timing["seconds"][m])
            label = f"{m} {amp}"
            print(
                f"  {label:16s} {gflop[m]:10.1f} {timing['median_s'][m]:8.3f} "
                f"{timing['median_cpu_s'][m]:8.3f} {mem:9.0f}   {steps}"
            )
    print(f"  DenseDINO / DINO: FLOPs {result['flop_ratio']:.3f} (forward + backward, float32)")
    for amp, timing in result["amp"].items():
        print(
            f"  DenseDINO / DINO: step {timing['step_ratio']:.3f} wall, "
            f"{timing['cpu_ratio']:.3f} CPU time, with amp {amp} (goal <= 1.10)"
        )
    if memory:
        print(
            f"  DenseDINO / DINO: peak memory above the model {memory['ratio']:.3f} "
            f"with amp {args.memory_amp} (goal <= 1.15)"
        )
    if len(result["amp"]) == 2:
        for m in METHODS:
            gain = result["amp"]["none"]["median_s"][m] / result["amp"]["bf16"]["median_s"][m]
            print(f"  {m}: float32 / bf16 step time {gain:.3f} (> 1: bf16 faster)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=["paper", "authors", "both"], default="both")
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps of each method first: the heap page-faults for about 3 DenseDINO "
        "steps before it settles",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--amp",
        choices=["none", "bf16", "both"],
        default="none",
        help="bf16 autocast of the step; both: float32 and bf16 alternately in one run",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (>= 1)")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument(
        "--dino-pairs",
        choices=["same", "all"],
        default="same",
        help="DINO's CLS pairs: same as DenseDINO's, or all (teacher, other view) pairs",
    )
    add_malloc_argument(parser)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--memory-child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_malloc(args.malloc)
    args.memory_amp = amp_modes(args)[0]
    if args.memory_child:
        print(json.dumps(memory_child(args.setting, args.memory_child, args)))
        return
    names = ["paper", "authors"] if args.setting == "both" else [args.setting]
    results = []
    for name in names:
        result = compare(name, args)
        if not args.no_memory:
            result["memory"] = memory(name, args)
        print_table(result, args)
        results.append(result)
    if args.json:
        meta = {"device": args.device, "amp": args.amp, "threads": torch.get_num_threads()}
        meta["malloc"] = args.malloc
        args.json.write_text(json.dumps({**meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""`densedino-train`: self-supervised pretraining from an mmengine config.

densedino-train CONFIG [--work-dir DIR] [--resume [auto|PATH]] [--cfg-options k=v ...]
                       [--launcher none|pytorch] [--amp [bf16|fp16]]
densedino-train export CHECKPOINT OUT_DIR [--which teacher|student] [--no-onnx]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from densedino.allocator import add_malloc_argument, set_malloc
from densedino.dist import finishes_process_group

EPILOG = """examples:
  densedino-train configs/demo/densedino_vit-t_demo.py --work-dir work_dirs/demo/densedino
  densedino-train configs/densedino/densedino_vit-s16_4x224_300e.py \\
      --cfg-options train_dataloader.dataset.root=/data/imagenet/train
  torchrun --nproc_per_node 8 -m densedino.cli.train CONFIG --launcher pytorch --amp
  densedino-train CONFIG --work-dir DIR --resume auto     # continue an interrupted run
  densedino-train export DIR/epoch_100.pth DIR/export     # backbone: safetensors, JSON, ONNX
"""


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densedino-train",
        description="Pretrain a ViT with DINO or DenseDINO (or another method of the suite) on "
        "mmengine. Checkpoints are written atomically to the work dir; at the end the teacher "
        "backbone is exported to WORK_DIR/export/backbone.safetensors (+ backbone.json, and "
        "backbone.onnx when the 'export' extra is installed).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="mmengine Python config, e.g. configs/demo/...py")
    parser.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="auto|PATH",
        help="resume from PATH, or with 'auto' (the default when the flag is bare) from the "
        "newest complete checkpoint in the work dir (fresh start if there is none)",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config entries, e.g. train_cfg.max_epochs=10 schedule.lr=1e-3",
    )
    parser.add_argument(
        "--launcher",
        choices=["none", "pytorch"],
        default="none",
        help="'pytorch' under torchrun (NCCL on GPU, gloo on CPU)",
    )
    parser.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        choices=["bf16", "fp16"],
        help="mixed precision (default bf16): AMP on GPU; on CPU bf16 autocast only, and only "
        "where the CPU has bf16 instructions (about 2.3x faster there; refused elsewhere, where "
        "emulated bf16 is about 10x slower); fp16 needs a GPU's loss scaler",
    )
    add_malloc_argument(parser)
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densedino-train export",
        description="Export the teacher backbone of a training checkpoint as safetensors + JSON "
        "metadata (loadable by densedino.load_backbone and timm) and as ONNX (dynamic batch and "
        "image size, checked against torch with ONNX Runtime).",
    )
    parser.add_argument("checkpoint", help="a densedino-train checkpoint (.pth)")
    parser.add_argument(
        "out_dir", help="folder for backbone.safetensors, backbone.json and backbone.onnx"
    )
    parser.add_argument("--which", choices=["teacher", "student"], default="teacher")
    parser.add_argument(
        "--no-onnx",
        dest="onnx",
        action="store_false",
        help="skip backbone.onnx (which needs the 'export' extra: onnx, onnxscript, onnxruntime)",
    )
    return parser


def parse_cfg_options(items: Sequence[str]) -> dict:
    from mmengine.config import DictAction

    namespace = argparse.Namespace()
    DictAction(option_strings=[], dest="opts")(None, namespace, list(items))
    return namespace.opts or {}


def build_config(args: argparse.Namespace):
    """The config after command-line overrides, device and resume decisions."""
    import torch
    from mmengine.config import Config

    from densedino.train.checkpoint import find_resume_checkpoint
    from densedino.train.optim import cpu_has_native_bf16

    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(parse_cfg_options(args.cfg_options))
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or f"work_dirs/{Path(args.config).stem}"
    cuda = torch.cuda.is_available()
    if not cuda:
        cfg.env_cfg.dist_cfg.backend = "gloo"
        cfg.model_wrapper_cfg.device_ids = None  # mmengine's default is [LOCAL_RANK], a GPU id
    if args.amp and cuda:
        dtype = "bfloat16" if args.amp == "bf16" else "float16"
        cfg.optim_wrapper.update(type="AmpOptimWrapper", dtype=dtype)
    elif args.amp == "bf16":
        if cpu_has_native_bf16() is False:
            raise SystemExit(
                "densedino-train: --amp bf16 on this CPU would be about 10x slower than float32: "
                "it has no bf16 instructions (AVX512-BF16 or AMX), so bf16 is emulated; drop --amp"
            )
        cfg.optim_wrapper.update(type="CPUAutocastOptimWrapper")
    elif args.amp:
        raise SystemExit("densedino-train: --amp fp16 needs a GPU; use --amp bf16 on CPU")
    cfg.custom_hooks = [dict(type="DINOScheduleHook", **cfg.schedule), *cfg.custom_hooks]
    dataset = cfg.train_dataloader.dataset
    dataset.setdefault("seed", cfg.randomness.get("seed", 0))
    if args.resume == "auto":
        found = find_resume_checkpoint(cfg.work_dir)
        if found is None:
            print(f"--resume auto: no checkpoint in {cfg.work_dir}, starting fresh")
        else:
            cfg.resume, cfg.load_from = True, str(found)
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


@finishes_process_group
def run_training(args: argparse.Namespace) -> int:
    from mmengine.runner import Runner

    import densedino.train  # noqa: F401  (registers the project's mmengine modules)
    from densedino.dist import init_cpu_process_group

    cfg = build_config(args)
    set_malloc(args.malloc)
    init_cpu_process_group(cfg.launcher)
    Runner.from_cfg(cfg).train()
    return 0


def run_export(args: argparse.Namespace) -> int:
    import torch
    from mmengine.config import Config

    import densedino.train  # noqa: F401  (allow-lists what our checkpoints hold)
    from densedino.train.export import export_backbone
    from densedino.weights import load_backbone

    backbone = load_backbone(args.checkpoint, which=args.which)
    meta = torch.load(args.checkpoint, map_location="cpu", weights_only=True).get("meta", {})
    metadata = {"source": str(args.checkpoint), "which": args.which}
    metadata.update({k: meta[k] for k in ("epoch", "iter") if k in meta})
    if "cfg" in meta:
        metadata["config"] = meta["cfg"]
        metadata["method"] = Config.fromstring(meta["cfg"], ".py").model.method.type
    for path in export_backbone(backbone, args.out_dir, metadata, onnx=args.onnx):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return run_export(export_parser().parse_args(argv[1:]))
    return run_training(train_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

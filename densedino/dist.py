"""torch.distributed set-up that mmengine only does for GPUs."""

from __future__ import annotations

import torch
import torch.distributed as dist


def init_cpu_process_group(launcher: str) -> None:
    """Start the gloo group of a torchrun job without GPUs.

    mmengine's ``init_dist`` always calls ``torch.cuda.set_device``; a group started here is
    taken by mmengine's Runner as already initialised. A no-op with GPUs or without torchrun.
    """
    if launcher == "pytorch" and not torch.cuda.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="gloo")

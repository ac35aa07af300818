"""torch.distributed set-up that mmengine only does for GPUs."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
import torch.distributed as dist


def init_cpu_process_group(launcher: str) -> None:
    """Start the gloo group of a torchrun job without GPUs.

    mmengine's ``init_dist`` always calls ``torch.cuda.set_device``; a group started here is
    taken by mmengine's Runner as already initialised. A no-op with GPUs or without torchrun.
    """
    if launcher == "pytorch" and not torch.cuda.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="gloo")


def finish_process_group() -> None:
    """Wait for every rank, then tear the group down (no-op without one).

    A rank that exits while its group is alive can abort in gloo's destructor ("terminate
    called without an active exception"), e.g. a worker rank done before rank 0 has written
    the results.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


P = ParamSpec("P")
R = TypeVar("R")


def finishes_process_group(entry: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command's entry point so that every rank runs :func:`finish_process_group`
    when it returns.

    A rank that raises prints its traceback at once and leaves without the barrier: the other
    ranks may be waiting in a collective it will never join, so a barrier would hang the job
    with the error unprinted; torchrun stops the other ranks when this one exits.
    """

    @functools.wraps(entry)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            result = entry(*args, **kwargs)
        except BaseException:
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank()
                print(f"[rank {rank}] failed:", file=sys.stderr, flush=True)
                traceback.print_exc()
                sys.stderr.flush()
            raise
        finish_process_group()
        return result

    return wrapper

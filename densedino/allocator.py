"""Keep freed memory in the process (glibc) instead of handing it back to the kernel each step.

glibc serves every allocation above its mmap threshold (32 MiB at most) with fresh pages and
unmaps them on free, so each large tensor of a training step is paid for again in page faults at
every step. DINO's 65536-prototype heads make many: their weights are 64 MiB and the reference
logits of a batch about 50 MiB. On the 2-core development machine a [65536, 256] division took
46 ms into a new tensor and 6 ms into an existing one; keeping freed memory made a DenseDINO
step of the paper setting 17 % cheaper (7 % once its heads stopped materialising their weights;
benchmarks/bench_train_step.py, docs/benchmarks.md). PyTorch's CPU allocator
has no cache of its own; its performance guide recommends preloading jemalloc or tcmalloc for
this. Switching glibc's mmap and trimming off gets the same reuse with nothing to install.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import platform

__all__ = ["add_malloc_argument", "keep_freed_memory", "set_malloc"]

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes: free memory stays in the heap


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it, so freed blocks are reused.

    Forked data-loader workers inherit the setting. The heap is never trimmed, so memory goes
    back to the system only when the process exits, and fragmentation can raise the peak a
    little (2-6 % above the model in bench_train_step). Returns False (and changes
    nothing) where the C library is not glibc.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it; musl raises AttributeError)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not applied:
        logger.warning("glibc mallopt refused the settings: freed memory goes back each step")
    return applied


def add_malloc_argument(parser: argparse.ArgumentParser) -> None:
    """``--malloc keep|release`` (default keep), for every command that runs training steps."""
    parser.add_argument(
        "--malloc",
        choices=["keep", "release"],
        default="keep",
        help="glibc: 'keep' (default) reuses freed memory instead of returning it to the kernel "
        "after every large tensor, which saves page faults in every step (7-17%% of a DenseDINO "
        "step on CPU here); 'release' is glibc's default behaviour",
    )


def set_malloc(mode: str) -> None:
    """Apply a ``--malloc`` choice: ``keep`` calls :func:`keep_freed_memory`."""
    if mode == "keep":
        keep_freed_memory()

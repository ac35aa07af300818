"""densedino.allocator: with glibc keeping freed memory, a large tensor allocated again
reuses pages instead of faulting them in anew."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from densedino.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(2):  # 64 MiB twice: the heap reaches its steady state (aligned blocks)
    torch.ones(16 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20)  # allocated, written, freed
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_page_faults_on_reallocation() -> None:
    applied, kept = faults("keep")
    _, released = faults("release")
    assert applied
    # 10 x 64 MiB = 163,840 pages faulted in again under glibc's default. Kept: 0, or now and
    # then one block's 16,384 (the heap settling on its aligned blocks), never more seen.
    assert released > 150_000
    assert kept <= 2 * 16_385

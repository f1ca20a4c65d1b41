"""lit_meta.allocator: a tuned process reuses freed memory instead of faulting it in again from the kernel."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import lit_meta.cli
from lit_meta.allocator import ENV

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Run in a fresh process: applies the tuning (or not, by the environment), then reports where a 24 MiB malloc comes
# from (mallinfo2: the heap's size grows, or the block is mapped on its own), whether the heap keeps it once freed
# (or trims it back to the kernel), and the minor page faults of what a meta-step does to the heap, reduced: allocate
# several large activations, free them all, again and again.
PROBE = """
import ctypes, resource, torch
from lit_meta.allocator import tune_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)
applied = tune_cpu_allocator()
MiB = 2**20
before = libc.mallinfo2().arena
block = libc.malloc(24 * MiB)
from_heap = (libc.mallinfo2().arena - before) // MiB
libc.free(block)
kept = (libc.mallinfo2().arena - before) // MiB
blocks = [torch.ones(2**21) for _ in range(8)]  # 8 x 8 MiB, once, so that the heap has grown
del blocks
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    blocks = [torch.ones(2**21) for _ in range(8)]
    del blocks
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(applied, from_heap, kept, faults)
"""
PAGES_TOUCHED = 10 * 8 * 2048  # the loop's: 10 x 8 blocks of 8 MiB in 4 KiB pages


def probe(**env: str) -> tuple[str, int, int, int]:
    """``(applied, MiB the heap grew by for a 24 MiB block, MiB of it kept after freeing it, loop page faults)``."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env={**os.environ, **env}, timeout=120
    ).stdout.split()
    return out[0], int(out[1]), int(out[2]), int(out[3])


@pytest.mark.skipif(not GLIBC, reason="the tuning is for glibc's malloc")
def test_tuned_process_serves_large_blocks_from_the_heap_and_keeps_them():
    applied, from_heap, kept, faults = probe()
    assert applied == "True"
    assert from_heap >= 20  # the rest may come from free space already at the top of the heap
    assert kept == from_heap
    # The blocks of every round reuse the first round's pages instead of faulting fresh ones in.
    assert faults < PAGES_TOUCHED / 5


@pytest.mark.skipif(not GLIBC, reason="the tuning is for glibc's malloc")
def test_environment_variable_leaves_the_c_library_alone():
    applied, from_heap, kept, _ = probe(**{ENV: "system"})
    assert applied == "False"
    # glibc's defaults: a fresh process maps a 24 MiB block on its own (and unmaps it when freed).
    assert from_heap == 0
    assert kept == 0


def test_command_line_tunes_its_process(monkeypatch):
    calls = []
    monkeypatch.setattr(lit_meta.cli, "tune_cpu_allocator", lambda: calls.append(True) or True)
    with pytest.raises(SystemExit):
        lit_meta.cli.main(["--help"])
    assert calls == [True]

"""Keep freed CPU memory in the process: glibc's defaults make every meta-step page-fault its activations afresh.

PyTorch's CPU tensors come from ``malloc``. With glibc's defaults, a block above the mmap threshold (128 KiB, raised
dynamically up to 32 MiB) is mapped on allocation and unmapped when freed, and free memory at the top of the heap is
returned to the kernel once it exceeds the trim threshold. A meta-step allocates and frees the same large activations
every step (a vmapped meta-batch holds tens to hundreds of MB of them), so each step faults its whole working set in
again, page by page, as zeroed memory from the kernel. Raising both thresholds keeps freed blocks for reuse, as the
CUDA caching allocator does on a GPU; the price is that the process keeps its peak heap size until it exits.

``benchmarks/speed.py --malloc system`` measures without it. On a 2-core x86-64 CPU a vmapped MAML step went from
0.230 to 0.212 s (Omniglot 5-way 1-shot, meta-batch 32) and from 2.27 to 1.53 s (20-way 1-shot, five inner steps,
meta-batch 16); docs/speed.md has the measurement (its CPU A).
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit machines (``DEFAULT_MMAP_THRESHOLD_MAX``): blocks up to this
#: size are served from, and returned to, the heap.
MMAP_THRESHOLD = 32 * 2**20
#: Never give the top of the heap back to the kernel (mallopt takes a C int).
TRIM_THRESHOLD = 2**31 - 1
#: ``LIT_META_MALLOC=system`` leaves the C library's settings alone.
ENV = "LIT_META_MALLOC"


def tune_cpu_allocator() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of unmapping and trimming it.

    Call it once, early, in a process that trains (the ``lit_meta`` command line and the benchmarks do). It changes
    the whole process, not only lit_meta's tensors, which is why importing the library does not do it.

    Returns:
        Whether the settings were applied: ``False`` outside glibc (macOS, Windows, musl), when ``mallopt`` refuses
        them, or when the environment variable ``LIT_META_MALLOC`` is ``system``.
    """
    if os.environ.get(ENV, "").lower() == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        # The process's own symbols include glibc's (no library search, which may start a subprocess).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Both: setting either one freezes glibc's dynamic adjustment of the other (the trim threshold alone would leave
    # the mmap threshold at 128 KiB, which measured slower than the defaults).
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))

"""The host allocator settings of guard_fast's commands (CPU speed).

glibc's malloc serves blocks above its mmap threshold with fresh mmap'd pages and hands freed
memory above its trim threshold at the top of the heap back to the kernel. A training step or
an attack step frees its activation and gradient buffers and allocates the same sizes again on
the next step, so by default every step faults its buffers in afresh and the kernel zeroes
them. Raised, the freed blocks stay in the process and are reused. bench/bench_allocator.py
(a fresh process per arm, alternated, 5 rounds, one thread, a 2-core AMD EPYC VM): 10 PGD
steps on 500 28x28 images 2.55 -> 1.83 s (x0.72 [0.72, 0.75]), kernel time 2.03 -> 0.02 s;
one MTT iteration at the fashion-mnist size 3.90 -> 3.26 s (x0.82 [0.71, 1.03]), kernel time
1.79 -> 0.43 s (bench/results/allocator.jsonl). The cost: the process keeps its peak heap
(resident memory does not shrink after a large step).

`python -m guard_fast.train` applies it at start-up (so the pipeline, the stages, the seed
workers and torchrun ranks get it); a library import does not. Skipped, leaving malloc as it
is, when GUARD_FAST_MALLOC=0, when any MALLOC_* variable is set (the user's own glibc tuning
wins), when another allocator is preloaded (jemalloc, tcmalloc, mimalloc), and off glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_cpu_allocator", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

# mallopt parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# the largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks up
# to 32 MiB come from the heap; larger ones are still mmap'd
MMAP_THRESHOLD = 32 * 1024 * 1024
# mallopt takes a C int: the largest trim threshold it can be given (2 GiB)
TRIM_THRESHOLD = 2**31 - 1
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    if os.environ.get("GUARD_FAST_MALLOC", "1") == "0":
        return "GUARD_FAST_MALLOC=0"
    own = sorted(k for k in os.environ if k.startswith("MALLOC_"))
    if own:
        return f"{own[0]} is set"
    pre = os.environ.get("LD_PRELOAD", "")
    other = next((a for a in _OTHER_ALLOCATORS if a in pre), None)
    if other:
        return f"{other} is preloaded"
    return None


def tune_cpu_allocator() -> str:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring).
    Returns "tuned", or why it was left alone."""
    why = _skip_reason()
    if why:
        return why
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "no glibc mallopt"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or \
            mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "mallopt refused"
    return "tuned"

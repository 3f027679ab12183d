"""How the process's C allocator keeps the memory a model batch frees, where the model runs on the CPU.

A batch of the default model in fp32 allocates activations of 24-200 MB per layer (at batch 2, the
3x3 windows' MLP holds 3,380 tokens x 3,584 x 4 bytes = 48 MB), frees them, and allocates them again
in the next layer. glibc serves any block above its mmap threshold (at most 32 MB, however it adapts)
with a fresh ``mmap`` and hands it back on ``free``: each new block then costs a page fault per 4 KiB
page, the kernel zeroing every page, and the work grows with the batch. Measured on a 2-core Sapphire
Rapids (``benchmarks/batch_size.py``): about 50,000 page faults per image at batch 2, and the visual
tower 10-15 % slower per image at batch 2-4 than with the memory kept, so that larger batches bought
almost nothing in fp32. Kept memory changes no number: the same operations run on other addresses.

The setting keeps freed blocks up to 1 GiB in the process's heap for the next batch (``mallopt``
M_MMAP_THRESHOLD and M_TRIM_THRESHOLD), process-wide and for the rest of the process: the resident
size stays at the largest batch's working set instead of falling back between batches. It applies
only where the C library is glibc and nobody chose otherwise: any ``MALLOC_*_`` variable or a
``glibc.malloc`` tunable in the environment, or another allocator in ``LD_PRELOAD`` (jemalloc,
tcmalloc), is the user's choice and is left alone. Elsewhere (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading

__all__ = ["KEPT_BYTES", "keep_freed_memory", "user_chose_allocator"]

KEPT_BYTES = 1 << 30  # freed blocks up to this size stay in the heap; larger ones go back to the system
OLD_GLIBC_MAX_BYTES = 32 << 20  # the largest mmap threshold older glibc accepts (64-bit)
M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_applied: bool | None = None  # the outcome of the first call: the setting is process-wide and permanent


def user_chose_allocator(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """True where the environment already decides how memory is allocated (see the module docstring)."""
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in environ):
        return True
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return True
    return any(name in environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))


def keep_freed_memory() -> bool:
    """Keep freed blocks in the heap (once per process); True where the setting is in force."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or user_chose_allocator():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the trim threshold: memory freed at the top of the heap is not handed back either. A glibc that
    # refuses mmap thresholds above 32 MiB (older ones check that limit) still keeps batch 1's blocks.
    trim = bool(mallopt(M_TRIM_THRESHOLD, KEPT_BYTES))
    return trim and bool(mallopt(M_MMAP_THRESHOLD, KEPT_BYTES) or mallopt(M_MMAP_THRESHOLD, OLD_GLIBC_MAX_BYTES))

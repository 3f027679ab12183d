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
only where the C library is glibc and nobody chose otherwise: any ``MALLOC_*`` variable or a
``glibc.malloc`` tunable in the environment, or another allocator in ``LD_PRELOAD`` (jemalloc,
tcmalloc), is the user's choice and is left alone. Elsewhere (macOS, musl), or where glibc refuses a
threshold that large, nothing changes, and ``--batch-size auto`` keeps the sizes measured without it.
``watch`` hands the kept memory back (``malloc_trim``) after each burst, so that it idles small.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import threading
from typing import Any

__all__ = ["KEPT_BYTES", "keep_freed_memory", "release_kept_memory", "user_chose_allocator"]

KEPT_BYTES = 1 << 30  # freed blocks up to this size stay in the heap; larger ones go back to the system
M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_applied: bool | None = None  # the outcome of the first call: the setting is process-wide and permanent


def user_chose_allocator(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """True where the environment already decides how memory is allocated (see the module docstring)."""
    if any(name.startswith("MALLOC_") for name in environ):  # MALLOC_TRIM_THRESHOLD_, MALLOC_ARENA_MAX...
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


def release_kept_memory() -> bool:
    """Hand the heap's free memory back to the system (``malloc_trim``) where it was kept; True if done."""
    libc = _libc() if _applied else None
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.cache
def _libc() -> Any:
    """glibc, its two functions typed (loaded once: ``watch`` trims after every burst); None elsewhere."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _apply() -> bool:
    libc = None if user_chose_allocator() else _libc()
    if libc is None:
        return False
    # The mmap threshold first: a glibc that refuses one this large (older ones stop at 32 MiB, which its
    # adaptive threshold reaches anyway) is left exactly as it was, trim threshold included.
    if not libc.mallopt(M_MMAP_THRESHOLD, KEPT_BYTES):
        return False
    # memory freed at the top of the heap is not handed back either
    return bool(libc.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES))

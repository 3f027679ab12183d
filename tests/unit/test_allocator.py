"""The C allocator keeps what a model batch frees: a block allocated again costs no page faults."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from winclip_cli.jobs.allocator import user_chose_allocator

# Allocates and fills a 64 MiB tensor twenty times and prints the minor page faults of the last ten,
# with and without keep_freed_memory() called first (argv[1]). torch allocates with posix_memalign,
# whose freed blocks glibc reuses only once a few of them lie side by side in the heap: the first
# allocations grow the heap (as a model's first batches do), the later ones reuse it.
FAULTS_SCRIPT = """
import ctypes, json, resource, sys
import torch
from winclip_cli.jobs.allocator import keep_freed_memory, release_kept_memory
ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, whatever the host's THP
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)  # 64 MiB: above any default threshold
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
again = keep_freed_memory() if sys.argv[1] == "keep" else None
kept_mb = resident_mb()
released = release_kept_memory()
print(json.dumps({"applied": applied, "again": again, "faults": faults[-10:], "released": released,
                  "kept_mb": kept_mb, "after_release_mb": resident_mb()}))
"""

PAGES_OF_64_MIB = (64 << 20) // 4096


def allocation_faults(mode: str, **env: str) -> dict:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")
    }
    done = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, env={**clean, **env}, check=True
    )
    return json.loads(done.stdout)


GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator (CI runs Debian)")
def test_a_kept_block_is_allocated_again_without_page_faults():
    plain = allocation_faults("plain")
    kept = allocation_faults("keep")
    # glibc hands a 64 MiB block back on free: every allocation faults in each of its 16,384 pages
    assert min(plain["faults"]) > PAGES_OF_64_MIB // 2, plain
    assert kept["applied"] is True and kept["again"] is True, kept
    assert sum(kept["faults"]) < PAGES_OF_64_MIB, kept  # the freed blocks are reused: not one block's pages
    # watch hands the kept memory back between bursts: the freed 64 MiB blocks leave the resident size
    assert plain["released"] is False and kept["released"] is True
    assert kept["kept_mb"] - kept["after_release_mb"] > 64, kept


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator (CI runs Debian)")
def test_an_allocator_the_user_chose_is_left_alone():
    kept = allocation_faults("keep", MALLOC_ARENA_MAX="2")
    assert kept["applied"] is False, kept
    assert min(kept["faults"]) > PAGES_OF_64_MIB // 2, kept  # glibc's own behaviour, untouched


@pytest.mark.parametrize(
    ("environ", "chose"),
    [
        ({}, False),
        ({"PATH": "/usr/bin", "MALLOC": "x", "MALLOCATE_": "x"}, False),  # not glibc's MALLOC_* variables
        ({"MALLOC_TRIM_THRESHOLD_": "131072"}, True),
        ({"MALLOC_ARENA_MAX": "2"}, True),
        ({"MALLOC_MMAP_THRESHOLD_": "0"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, True),
        ({"GLIBC_TUNABLES": "glibc.rtld.nns=4"}, False),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
        ({"LD_PRELOAD": "/opt/lib/libtcmalloc_minimal.so"}, True),
        ({"LD_PRELOAD": "/opt/lib/libfaketime.so"}, False),
    ],
)
def test_user_chose_allocator(environ, chose):
    assert user_chose_allocator(environ) is chose


def test_a_cpu_session_keeps_freed_memory(tiny_options, monkeypatch):
    from winclip_cli.jobs import kernel
    from winclip_cli.spec import InputSpec

    calls = []
    monkeypatch.setattr(kernel, "keep_freed_memory", lambda: calls.append("kept") or True)
    session = kernel.Session.open(tiny_options, InputSpec(), text=None)
    assert session.backbone.device.type == "cpu"
    assert calls == ["kept"]

"""glibc malloc settings, checked in fresh processes through glibc's and the kernel's own counters.

`runtime.release_freed_memory_eagerly` (part of `--grad-checkpointing`): tensors of a few MiB are
mapped on their own, so freeing one returns its pages to the system, instead of coming from the heap
whose holes stay resident (mallinfo2). `runtime.keep_freed_memory` (every other run): a large block
freed and allocated again reuses pages already mapped, instead of faulting in each page anew
(the process's minor page faults)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

# Frees a 4 MiB tensor (glibc then raises its mmap threshold to 4 MiB), allocates 64 x 1 MiB and
# prints how many of them glibc mapped on their own (mallinfo2's hblks).
SCRIPT = """
import ctypes, sys, torch
from effnet.runtime import release_freed_memory_eagerly
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]
libc.mallinfo2.restype = Info
if sys.argv[1] == "eager":
    assert release_freed_memory_eagerly()
warm = torch.ones(4 << 20, dtype=torch.uint8)
del warm
before = libc.mallinfo2().hblks
blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(64)]
print(libc.mallinfo2().hblks - before)
"""


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


def _mapped_blocks(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallopt, mallinfo2)")
def test_freed_blocks_are_returned_to_the_system():
    assert _mapped_blocks("default") < 8  # glibc's dynamic threshold: from the heap
    assert _mapped_blocks("eager") >= 64  # each mapped on its own, unmapped when freed


# Allocates, fills and frees a 64 MiB tensor (16,384 pages of 4 KiB) six times and prints the fewest minor
# page faults of a round after the first: glibc's default unmaps such a block on free, so every round faults
# anew. Kept, a round may still miss the freed block (an aligned request a few bytes larger than the hole
# the last one left), but within a few rounds one reuses it whole.
REUSE_SCRIPT = """
import resource, sys, torch
from effnet.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(6):
    before = faults()
    block = torch.ones(64 << 20, dtype=torch.uint8)
    del block
    counts.append(faults() - before)
print(min(counts[1:]))
"""


def _reuse_faults(mode: str, env: dict[str, str] | None = None) -> int:
    run = subprocess.run(
        [sys.executable, "-c", REUSE_SCRIPT, mode], capture_output=True, text=True, check=True, env=env
    )
    return int(run.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_blocks_are_reused_without_page_faults():
    assert _reuse_faults("default") > 10_000  # unmapped on free: the 16,384 pages faulted in each round
    assert _reuse_faults("keep") < 1_000  # a round on the same pages, still mapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_can_be_turned_off():
    env = os.environ | {"EFFNET_MALLOC": "system"}
    with pytest.raises(subprocess.CalledProcessError):  # keep_freed_memory() declines: the assert fails
        _reuse_faults("keep", env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_measuring_processes_keep_freed_memory_like_their_parent():
    script = (
        "from effnet import profiling, runtime\n"
        "print(profiling.run_isolated(runtime.malloc_state))\n"
        "runtime.keep_freed_memory()\n"
        "print(profiling.run_isolated(runtime.malloc_state))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "EFFNET_MALLOC"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    before, after = run.stdout.splitlines()
    assert "system" in before
    assert "keeps freed blocks" in after

"""`runtime.release_freed_memory_eagerly` (part of `--grad-checkpointing`): tensors of a few MiB are
mapped on their own, so freeing one returns its pages to the system, instead of coming from the heap
whose holes stay resident. Checked through glibc's own counters (mallinfo2), in fresh processes."""

from __future__ import annotations

import ctypes
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

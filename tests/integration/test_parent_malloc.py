"""The daemon asks glibc to keep its large read buffers on the heap (`keep_large_buffers_on_heap`).

Checked in a fresh interpreter through glibc's own count of memory-mapped chunks
(``mallinfo2().hblks``): a 1 MiB buffer is mapped by default, and comes from the heap after
the call.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, json, sys
from nitro_netd.parent.daemon import keep_large_buffers_on_heap

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
tuned = keep_large_buffers_on_heap() if sys.argv[1] == "tuned" else None
before = libc.mallinfo2().hblks
buffers = [bytearray(1 << 20) for _ in range(4)]
print(json.dumps({"tuned": tuned, "mapped": libc.mallinfo2().hblks - before}))
"""


def _probe(mode: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 and "mallinfo2" in result.stderr:
        pytest.skip("this libc has no mallinfo2 (not glibc >= 2.33)")
    assert result.returncode == 0, result.stderr
    outcome: dict[str, object] = json.loads(result.stdout)
    return outcome


def test_parent_malloc_large_buffers_are_mapped_by_default() -> None:
    assert _probe("default")["mapped"] == 4


def test_parent_malloc_large_buffers_come_from_the_heap_once_tuned() -> None:
    outcome = _probe("tuned")
    assert outcome == {"tuned": True, "mapped": 0}

"""The Internet checksum (RFC 1071), fast for large payloads.

numpy sums 64 KiB in about 20 µs; the pure-Python fallback (one big-integer
modulo, PERF-NOTES.md) takes about 150 µs and is used when numpy is missing.
Both return the same 16-bit one's complement sum, so callers never care which ran.
"""

from __future__ import annotations

from typing import Final

try:  # numpy is optional: the `fast` extra.
    import numpy as _np
except ImportError:  # pragma: no cover - exercised only without numpy
    _np = None  # type: ignore[assignment]

Buffer = bytes | bytearray | memoryview

_NUMPY_MIN: Final = 256
"""Below this many bytes the big-integer method wins over numpy's call overhead."""


def fold(total: int) -> int:
    """Fold carries of a one's complement sum back into 16 bits."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum_int(data: Buffer) -> int:
    """One's complement sum via one big integer: 2**16 ≡ 1 (mod 0xffff)."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    value = int.from_bytes(data, "big") % 0xFFFF
    if value == 0 and any(data):
        return 0xFFFF
    return value


def _sum_numpy(data: Buffer) -> int:
    n = len(data)
    even = n & ~1
    words = _np.frombuffer(data, dtype=">u2", count=even // 2)
    total = int(words.sum(dtype=_np.uint64))
    if n & 1:
        total += memoryview(data)[n - 1] << 8
    return fold(total)


def ones_complement_sum(data: Buffer, initial: int = 0) -> int:
    """Return the folded 16-bit one's complement sum of `data` plus `initial`."""
    if _np is not None and len(data) >= _NUMPY_MIN:
        partial = _sum_numpy(data)
    else:
        partial = _sum_int(data)
    return fold(partial + initial)


def internet_checksum(data: Buffer, initial: int = 0) -> int:
    """Return the Internet checksum (RFC 1071) of `data`, seeded with a partial sum."""
    return ~ones_complement_sum(data, initial) & 0xFFFF

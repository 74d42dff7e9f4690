"""Sequence-number arithmetic modulo 2**32 (RFC 9293 §3.4)."""

from __future__ import annotations

from typing import Final

MOD: Final = 1 << 32
_HALF: Final = 1 << 31


def seq_add(a: int, n: int) -> int:
    """`a + n` on the sequence circle."""
    return (a + n) & 0xFFFFFFFF


def seq_diff(a: int, b: int) -> int:
    """The signed distance `a - b`, in -2**31 .. 2**31-1."""
    return ((a - b + _HALF) & 0xFFFFFFFF) - _HALF


def seq_lt(a: int, b: int) -> bool:
    """`a` comes before `b`."""
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    """`a` comes before `b` or is `b`."""
    return seq_diff(a, b) <= 0

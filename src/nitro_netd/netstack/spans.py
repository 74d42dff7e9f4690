"""Host bytes the stack holds by reference, never by value.

Theory of operation
-------------------
A shell may keep a flow's bytes from the host outside Python (the daemon splices them
into a pipe) and tell the stack only how many arrived: a `HostSpan`. The stack queues a
span like bytes: it counts in the send buffer, the window and the read pausing. Where a
segment's payload lies in spans, the stack puts a `HostSlice` in the frame instead of
bytes: the payload's stream position and length, and how far the enclave has
acknowledged, for the shell to resolve when it writes the frame to the link (and to let
go of what is acknowledged). Positions count the flow's host bytes from 0, bytes and
spans alike, on both sides. The stack never looks inside: `source` is the shell's.
Spans need checksum offload, since the stack cannot sum bytes it does not have.
"""

from __future__ import annotations

from typing import Any


class HostSpan:
    """`length` bytes the shell holds for one flow, next in its stream."""

    __slots__ = ("length", "source")

    def __init__(self, source: Any, length: int) -> None:
        self.source = source
        """The shell's holder of the bytes (opaque to the stack)."""
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"HostSpan({self.length})"


class HostSlice:
    """A segment's payload held by the shell: stream bytes [position, position + length)."""

    __slots__ = ("length", "position", "released", "source")

    def __init__(self, source: Any, position: int, length: int, released: int) -> None:
        self.source = source
        self.position = position
        self.length = length
        self.released = released
        """Every byte before this position is acknowledged: the shell may let it go."""

    def __len__(self) -> int:
        return self.length

    def __bytes__(self) -> bytes:
        raise TypeError("a HostSlice's bytes are held by the shell")

    def __repr__(self) -> str:
        return f"HostSlice({self.position}, {self.length}, released={self.released})"

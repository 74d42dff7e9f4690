"""The bytes a flow holds for the enclave: sent-but-unacknowledged, then not yet sent.

A deque of the chunks the host gave us, never joined: appending is O(1) and does not copy,
acknowledging drops whole chunks and moves an offset into the first. A segment is a view
of one chunk, or (rarely, when it straddles two) a join of the pieces. A chunk may also
be a `HostSpan` (bytes the shell holds): a segment in spans is a `HostSlice`, never mixed
with bytes (a slice stops where the kind of chunk changes).
"""

from __future__ import annotations

from collections import deque

from nitro_netd.netstack.spans import HostSlice, HostSpan

Payload = bytes | memoryview | HostSlice


class SendQueue:
    """Bytes from offset 0 (= `snd_una`) to `len(self)`."""

    def __init__(self) -> None:
        self._chunks: deque[bytes | HostSpan] = deque()
        self._head = 0
        """Bytes of `_chunks[0]` already acknowledged."""
        self.size = 0
        """Bytes held (`len()`; an attribute for the data path, which reads it per segment)."""
        self.base = 0
        """The stream position of offset 0: bytes acknowledged (consumed) so far."""
        self.spans = 0
        """`HostSpan` chunks held."""

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes | HostSpan) -> None:
        """Queue bytes (or a span of them) after everything held."""
        if len(data):
            self._chunks.append(data)
            self.size += len(data)
            if isinstance(data, HostSpan):
                self.spans += 1

    def consume(self, n: int) -> None:
        """Forget the first `n` bytes (they were acknowledged)."""
        n = min(n, self.size)
        self.size -= n
        self.base += n
        chunks = self._chunks
        while n:
            room = len(chunks[0]) - self._head
            if n < room:
                self._head += n
                return
            n -= room
            if isinstance(chunks.popleft(), HostSpan):
                self.spans -= 1
            self._head = 0

    def slice(self, offset: int, n: int) -> Payload:
        """Return bytes [offset, offset + n) (clipped to what is held, and to the chunks of
        one kind: the result may be shorter than `n`)."""
        n = min(n, self.size - offset)
        if n <= 0:
            return b""
        position = offset + self._head
        for index, chunk in enumerate(self._chunks):
            size = len(chunk)
            if position < size:
                if isinstance(chunk, HostSpan):
                    return self._span_slice(index, position, offset, n)
                if position + n <= size:
                    return memoryview(chunk)[position : position + n]
                return self._join(index, position, n)
            position -= size
        return b""

    def _join(self, index: int, position: int, n: int) -> bytes:
        parts: list[bytes | memoryview] = []
        for i in range(index, len(self._chunks)):
            chunk = self._chunks[i]
            if isinstance(chunk, HostSpan):
                break
            view = memoryview(chunk)[position:]
            parts.append(view[:n])
            n -= len(parts[-1])
            position = 0
            if n <= 0:
                break
        return b"".join(parts)

    def _span_slice(self, index: int, position: int, offset: int, n: int) -> HostSlice:
        first = self._chunks[index]
        assert isinstance(first, HostSpan)
        available = first.length - position
        for i in range(index + 1, len(self._chunks)):
            if available >= n:
                break
            chunk = self._chunks[i]
            if not isinstance(chunk, HostSpan):
                break
            available += chunk.length
        return HostSlice(first.source, self.base + offset, min(n, available), self.base)

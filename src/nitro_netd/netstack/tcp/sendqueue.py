"""The bytes a flow holds for the enclave: sent-but-unacknowledged, then not yet sent.

A deque of the chunks the host gave us, never joined: appending is O(1) and does not copy,
acknowledging drops whole chunks and moves an offset into the first. A segment is a view
of one chunk, or (rarely, when it straddles two) a join of the pieces.
"""

from __future__ import annotations

from collections import deque


class SendQueue:
    """Bytes from offset 0 (= `snd_una`) to `len(self)`."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._head = 0
        """Bytes of `_chunks[0]` already acknowledged."""
        self.size = 0
        """Bytes held (`len()`; an attribute for the data path, which reads it per segment)."""

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes) -> None:
        """Queue bytes after everything held."""
        if data:
            self._chunks.append(data)
            self.size += len(data)

    def consume(self, n: int) -> None:
        """Forget the first `n` bytes (they were acknowledged)."""
        n = min(n, self.size)
        self.size -= n
        chunks = self._chunks
        while n:
            room = len(chunks[0]) - self._head
            if n < room:
                self._head += n
                return
            n -= room
            chunks.popleft()
            self._head = 0

    def slice(self, offset: int, n: int) -> bytes | memoryview:
        """Return bytes [offset, offset + n) (clipped to what is held)."""
        n = max(0, min(n, self.size - offset))
        position = offset + self._head
        for index, chunk in enumerate(self._chunks):
            if position < len(chunk):
                if position + n <= len(chunk):
                    return memoryview(chunk)[position : position + n]
                return self._join(index, position, n)
            position -= len(chunk)
        return b""

    def _join(self, index: int, position: int, n: int) -> bytes:
        parts: list[bytes | memoryview] = []
        for i in range(index, len(self._chunks)):
            chunk = memoryview(self._chunks[i])[position:]
            parts.append(chunk[:n])
            n -= len(parts[-1])
            position = 0
            if n <= 0:
                break
        return b"".join(parts)

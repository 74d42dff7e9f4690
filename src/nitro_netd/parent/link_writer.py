"""Writes frames to the agent with scatter-gather I/O and no joining copies.

Theory of operation
-------------------
Each frame goes out as two buffers, its length prefix and the frame itself, in one
`os.writev` call for the whole batch (at most IOV_MAX buffers a call). Whatever the kernel
does not take waits in a queue of buffers, sent when the socket is writable again; the
frames themselves are never copied into a join buffer. The writer has its own duplicate of
the link's file descriptor, so its writability watch never collides with the asyncio
transport that reads the link. Above `high_water` queued bytes the owner is told to stop
reading host sockets, and below `low_water` to start again. The queue holds views of the
flows' send buffers (which bound it already), so the mark is generous: a low one paused
every busy flow's reader over and over, for nothing but system calls.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from collections.abc import Callable
from typing import Final

from nitro_netd.link import LinkProtocol
from nitro_netd.netstack.output import Frame, SplitFrame

IOV_MAX: Final = 1024

Buffer = bytes | bytearray | memoryview


class LinkWriter:
    """Queues and writes buffers to a stream socket's file descriptor."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        protocol: LinkProtocol,
        on_writable: Callable[[bool], None],
        *,
        high_water: int = 16 << 20,
    ) -> None:
        self.loop = loop
        self.fd = os.dup(fd)
        os.set_blocking(self.fd, False)
        self.protocol = protocol
        self._on_writable = on_writable
        self.high_water = high_water
        self.low_water = high_water // 4
        self._queue: deque[Buffer] = deque()
        self.queued = 0
        self._watching = False
        self._paused = False
        self.error: OSError | None = None
        self.on_error: Callable[[OSError], None] | None = None
        self._pack = protocol.length_prefix.pack
        self._header = protocol.header_size

    def write_frames(self, frames: list[Frame]) -> None:
        """Queue frames with their length prefixes and write what the kernel takes now."""
        pack = self._pack
        queue = self._queue
        header = self._header
        for frame in frames:
            queue.append(pack(len(frame)))
            if isinstance(frame, SplitFrame):
                queue.append(frame.head)
                queue.append(frame.payload)
            else:
                queue.append(frame)
            self.queued += len(frame) + header
        self._flush()

    def write_raw(self, data: bytes) -> None:
        """Queue bytes as they are (the handshake reply)."""
        self._queue.append(data)
        self.queued += len(data)
        self._flush()

    def _flush(self) -> None:
        queue = self._queue
        while queue and self.error is None:
            if len(queue) <= IOV_MAX:
                batch, size = list(queue), self.queued
            else:
                batch = list(itertools.islice(queue, IOV_MAX))
                size = sum(map(len, batch))
            try:
                written = os.writev(self.fd, batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail(exc)
                return
            if written == self.queued:  # the common case: everything went
                queue.clear()
                self.queued = 0
                break
            self._consume(written)
            if written < size:
                break
        self._update_watch()

    def _consume(self, written: int) -> None:
        queue = self._queue
        self.queued -= written
        while written:
            head = queue[0]
            if written >= len(head):
                written -= len(head)
                queue.popleft()
            else:
                queue[0] = memoryview(head)[written:]
                written = 0

    def _update_watch(self) -> None:
        want = bool(self._queue) and self.error is None
        if want != self._watching:
            if want:
                self.loop.add_writer(self.fd, self._flush)
            else:
                self.loop.remove_writer(self.fd)
            self._watching = want
        if not self._paused and self.queued > self.high_water:
            self._paused = True
            self._on_writable(False)
        elif self._paused and self.queued < self.low_water:
            self._paused = False
            self._on_writable(True)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self._queue.clear()
        self.queued = 0
        self._update_watch()
        if self.on_error is not None:
            self.on_error(exc)

    def close(self) -> None:
        """Drop what is queued and release the descriptor."""
        self._queue.clear()
        self.queued = 0
        if self._watching:
            self.loop.remove_writer(self.fd)
            self._watching = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

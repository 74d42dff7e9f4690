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

A frame whose payload the host side holds in a pipe (a `HostSlice`, see splice.py) waits
in the queue as a `_SpliceFrame`. When it reaches the front, its `SpliceBuffer` prepares
it (before any of it is written: a slice that cannot be served drops the frame whole).
Its headers are then written, and its payload spliced, into the writer's own pipe, and
runs of such frames leave that pipe for the link in one splice: one wake-up of the agent
per run, as with writev, not one per frame (or per header). Plain buffers wait until the
pipe is empty, so the link's byte order is the queue's.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Final, cast

from nitro_netd.link import LinkProtocol
from nitro_netd.netstack.output import Frame, SplitFrame
from nitro_netd.netstack.spans import HostSlice
from nitro_netd.parent.host import descriptor_hint
from nitro_netd.parent.splice import PIPE_SIZE, SPLICE_FLAGS, SpliceBuffer

logger = logging.getLogger(__name__)

IOV_MAX: Final = 1024

Buffer = bytes | bytearray | memoryview


class _SpliceFrame:
    """A queued frame whose payload a `SpliceBuffer` holds, not yet prepared."""

    __slots__ = ("head", "length", "prefix", "slice")

    def __init__(self, prefix: bytes, head: bytes | bytearray, piece: HostSlice) -> None:
        self.prefix = prefix
        self.head = head
        self.slice = piece
        self.length = len(prefix) + len(head) + piece.length

    def __len__(self) -> int:
        return self.length


class _PipedFrame:
    """A prepared frame on its way into the writer's pipe: `header` (prefix, headers and
    any bytes sent before), then `remaining` bytes from the front of `buffer`'s pipe."""

    __slots__ = ("buffer", "header", "remaining")

    def __init__(self, header: bytes | memoryview, buffer: SpliceBuffer, remaining: int) -> None:
        self.header = header
        self.buffer = buffer
        self.remaining = remaining

    def __len__(self) -> int:
        return len(self.header) + self.remaining


Item = Buffer | _SpliceFrame | _PipedFrame


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
        pipe_size: int = PIPE_SIZE,
    ) -> None:
        self.loop = loop
        self.fd = os.dup(fd)
        os.set_blocking(self.fd, False)
        self.protocol = protocol
        self._on_writable = on_writable
        self.high_water = high_water
        self.low_water = high_water // 4
        self._queue: deque[Item] = deque()
        self.queued = 0
        self._spliced = 0
        """`_SpliceFrame`s and `_PipedFrame`s in the queue (none: the plain writev path)."""
        self._pipe_r = self._pipe_w = -1
        """The writer's pipe (opened with the first spliced frame)."""
        self._piped = 0
        """Bytes in the pipe, not yet in the link (counted in `queued`)."""
        self._pipe_size = pipe_size
        self._pipe_failed = False
        """The pipe could not be opened: spliced frames go straight into the link."""
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
            if isinstance(frame, SplitFrame):
                payload = frame.payload
                if isinstance(payload, HostSlice):
                    queue.append(_SpliceFrame(pack(len(frame)), frame.head, payload))
                    payload.source.queued_slices += 1
                    self._spliced += 1
                else:
                    queue.append(pack(len(frame)))
                    queue.append(frame.head)
                    queue.append(payload)
            else:
                queue.append(pack(len(frame)))
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
            if self._spliced:
                front = queue[0]
                if isinstance(front, _SpliceFrame):
                    self._prepare(front)
                    continue
                if isinstance(front, _PipedFrame):
                    if not self._pipe_frame(front):
                        break
                    continue
                if self._piped and not self._drain_pipe():
                    break
                batch = self._buffers_before_splice()
                size = sum(map(len, batch))
            elif self._piped and not self._drain_pipe():
                break
            elif len(queue) <= IOV_MAX:
                batch, size = list(queue), self.queued  # type: ignore[arg-type]
            else:
                batch = list(itertools.islice(queue, IOV_MAX))  # type: ignore[arg-type]
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
        if self._piped and self.error is None:
            self._drain_pipe()
        self._update_watch()

    def _buffers_before_splice(self) -> list[Buffer]:
        batch: list[Buffer] = []
        for item in itertools.islice(self._queue, IOV_MAX):
            if isinstance(item, _SpliceFrame | _PipedFrame):
                break
            batch.append(item)
        return batch

    def _prepare(self, frame: _SpliceFrame) -> None:
        """Turn the front `_SpliceFrame` into a `_PipedFrame` (or drop it whole)."""
        queue = self._queue
        buffer: SpliceBuffer = frame.slice.source
        prepared = buffer.prepare(frame.slice)
        if prepared is None:
            queue.popleft()
            self._spliced -= 1
            self.queued -= frame.length
            return
        old, fresh = prepared
        header = frame.prefix + frame.head + old if old else frame.prefix + frame.head
        queue[0] = _PipedFrame(header, buffer, fresh)

    def _pipe_frame(self, frame: _PipedFrame) -> bool:
        """Move the front frame into the writer's pipe (or, without one, into the link
        itself); False if the link is full."""
        if self._pipe_w < 0 and not self._pipe_failed:
            self._open_pipe()
        direct = self._pipe_w < 0
        target = self.fd if direct else self._pipe_w
        stalled = False
        while True:
            try:
                if frame.header:
                    went = os.write(target, frame.header)
                    frame.header = memoryview(frame.header)[went:]
                elif frame.remaining:
                    went = frame.buffer.splice_out(target, frame.remaining)
                    frame.remaining -= went
                else:
                    self._queue.popleft()
                    self._spliced -= 1
                    return True
            except BlockingIOError:
                went = 0
            except OSError as exc:
                self._fail(exc)
                return False
            if direct:
                self.queued -= went
            else:
                self._piped += went
            if not went:
                if direct or not self._drain_pipe():  # the link is full
                    return False
                if stalled:  # an empty pipe took nothing: the buffer lacks the bytes
                    self._fail(OSError(errno.EIO, "a spliced frame's bytes are missing"))
                    return False
            stalled = not went

    def _drain_pipe(self) -> bool:
        """Splice the pipe into the link; True once it is empty."""
        while self._piped:
            try:
                went = os.splice(self._pipe_r, self.fd, self._piped, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                self._fail(exc)
                return False
            if not went:  # (never, with `_piped` right: a guard against a hot loop)
                self._fail(OSError(errno.EIO, "the link's pipe ended early"))
                return False
            self._piped -= went
            self.queued -= went
        return True

    def _open_pipe(self) -> None:
        try:
            self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            fcntl.fcntl(self._pipe_w, fcntl.F_SETPIPE_SZ, self._pipe_size)
        except OSError as exc:
            self._close_pipe()
            self._pipe_failed = True
            logger.warning(
                "link: no pipe for spliced frames (%s): each goes to the link in two or more "
                "writes%s", exc, descriptor_hint(exc),
            )  # fmt: skip

    def _close_pipe(self) -> None:
        for fd in {self._pipe_r, self._pipe_w} - {-1}:
            os.close(fd)
        self._pipe_r = self._pipe_w = -1
        self._piped = 0

    def _consume(self, written: int) -> None:
        queue = self._queue
        self.queued -= written
        while written:
            head = cast(Buffer, queue[0])  # a batch never holds splice items
            if written >= len(head):
                written -= len(head)
                queue.popleft()
            else:
                queue[0] = memoryview(head)[written:]
                written = 0

    def _update_watch(self) -> None:
        want = bool(self._queue or self._piped) and self.error is None
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
        self._spliced = 0
        self._close_pipe()
        self._update_watch()
        if self.on_error is not None:
            self.on_error(exc)

    def close(self) -> None:
        """Drop what is queued and release the descriptor."""
        self._queue.clear()
        self.queued = 0
        self._spliced = 0
        self._close_pipe()
        if self._watching:
            self.loop.remove_writer(self.fd)
            self._watching = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

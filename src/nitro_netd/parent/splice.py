"""A bulk flow's bytes from the world, moved to the link without entering Python.

Theory of operation
-------------------
Copying is what a busy flow to the enclave costs: `recv` copies each byte from the host
socket into Python and `writev` copies it again into the link. A `SpliceBuffer` moves them
by page reference instead, with splice(2) and tee(2) through pipes:

* `fill` splices the host socket into the `fresh` pipe; the stack is told only how many
  bytes came (a `HostSpan`), and builds its segments as `HostSlice`s of stream positions.
  A full pipe stops reading until the writer takes some out (`waiting_for_room`), and
  TCP urgent data, where splice(2) stops for good, is stepped over with one plain read.
* when the link writer reaches such a segment, `prepare` tees its bytes from `fresh` into
  the `kept` pipes (a second reference to the same pages, held until the enclave
  acknowledges them) and the writer splices them from `fresh` onwards (`splice_out`).
  A pipe holds a number of page pieces, not of bytes: when the last kept pipe is full,
  the tee goes into a new one (a pipe's tee cannot resume mid-way, so the new pipe
  starts where the tee started, and its bytes overlap the full pipe's last few).
  Acknowledged bytes (before each slice's `released` position) are let go, spliced into
  /dev/null, in batches of `RELEASE_BATCH`; a pipe emptied so is closed. Once the
  enclave has acknowledged all the flow's spans the stack says so (`TcpRelease`) and
  everything is let go (after the frames still queued): an idle keep-alive connection
  pins no pages.
* a segment sent again (a retransmission: rare, the link is ordered) is served from
  `store`: the kept pipes are read out into it (a copy, once) and the segment is written
  from there. The same happens when no new pipe can be opened.

Stream positions, counted from the flow's first host byte (bytes the stack got copied
before splicing began included), describe where every byte is:

    store  [store_pos, store_end)                  read out of kept, oldest first
    kept   [kept[0].start, tee_pos), from store_end: tee'd, sent or being sent
    fresh  [fresh_pos, read_pos)                   from the host socket, oldest first

`fresh_pos < tee_pos` while the writer is splicing a segment out (and after the link
dropped one half-written: `prepare` then discards the rest, which `kept` has). A slice
that asks for bytes already let go, or not yet read, is refused (`prepare` returns None;
the frame is dropped before any of it is written). A failed pipe operation breaks the
buffer: its bytes are gone, `on_broken` is told (the flow must be reset).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import select
import struct
from collections.abc import Callable
from typing import Final

from nitro_netd.frames.errors import DropReason
from nitro_netd.netstack.spans import HostSlice

logger = logging.getLogger(__name__)

PIPE_SIZE: Final = 1 << 20
"""Each pipe's capacity (the most an unprivileged process may set: fs.pipe-max-size)."""
RELEASE_BATCH: Final = 256 << 10
"""Acknowledged bytes are let go of in batches of at least this (one system call each)."""
_F_SETPIPE_SZ: Final = 1031
_SIOCATMARK: Final = 0x8905
_INT: Final = struct.Struct("i")
SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0


def _load_tee() -> Callable[[int, int, int, int], int] | None:
    try:
        tee = ctypes.CDLL(None, use_errno=True).tee
    except (OSError, AttributeError):
        return None
    tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
    tee.restype = ctypes.c_ssize_t
    return tee


_tee = _load_tee() if hasattr(os, "splice") else None
_devnull = -1


def available() -> bool:
    """True where splice and tee can be used (Linux with glibc or musl)."""
    return _tee is not None


def _discard_fd() -> int:
    global _devnull
    if _devnull < 0:
        _devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return _devnull


class _Pipe:
    """A pipe holding stream bytes [start, end)."""

    __slots__ = ("end", "r", "start", "w")

    def __init__(self, position: int, size: int) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, size)
        except OSError:
            self.close()
            raise
        self.start = self.end = position

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class SpliceBuffer:
    """One flow's bytes from the host, held in pipes. See the module docstring."""

    def __init__(self, position: int, *, pipe_size: int = PIPE_SIZE) -> None:
        """Open the pipes; the next byte read is stream byte `position`.

        Raises:
            OSError: no pipes (out of descriptors, or the user's pipe quota is used up).
        """
        self.pipe_size = pipe_size
        self.fresh = _Pipe(position, pipe_size)
        try:
            self.kept = [_Pipe(position, pipe_size)]
        except OSError:
            self.fresh.close()
            raise
        self.store = bytearray()
        self.store_pos = position
        self.tee_pos = position
        self.fresh_pos = position
        self.read_pos = position
        self.closed = False
        self.leftover = bytearray()
        """After `close`: the rest of the frame being spliced out, to write instead."""
        self.waiting_for_room = False
        """A read found `fresh` full: reading waits until some went (`on_room`)."""
        self.on_room: Callable[[], None] | None = None
        self.on_broken: Callable[[OSError], None] | None = None
        self.queued_slices = 0
        """Frames of this buffer's bytes queued in the link writer, not yet prepared."""
        self._release_wanted = -1
        """Where `release` asked to let go up to while frames were queued."""
        self.on_refused: Callable[[DropReason], None] | None = None
        """A slice could not be served (the flow ended, or a bug): its frame is dropped."""
        self.on_drained: Callable[[], None] | None = None
        """Called when the last queued frame was prepared (and a release waiting for it
        done): an owner waiting for `holds_nothing` looks again."""

    @property
    def holds_nothing(self) -> bool:
        """Every byte read was let go and no queued frame needs the buffer."""
        return (
            not self.queued_slices and self._release_wanted < 0 and self.store_pos >= self.read_pos
        )

    @property
    def store_end(self) -> int:
        return self.store_pos + len(self.store)

    # --- the host side ---------------------------------------------------------------

    def fill(self, sock_fd: int, n: int) -> int:
        """Splice up to `n` bytes from the host socket into `fresh`; 0 at end of stream.

        Raises:
            BlockingIOError: nothing to read, or `fresh` is full (`waiting_for_room` set).
            OSError: the socket failed.
        """
        try:
            got = os.splice(sock_fd, self.fresh.w, n, flags=SPLICE_FLAGS)
        except BlockingIOError:
            # The socket's bytes, end or error wait behind a full pipe (a level-triggered
            # reader would spin): read again once the writer has taken some out.
            self.waiting_for_room = _pipe_full(self.fresh.w)
            if self.waiting_for_room or not _at_urgent_mark(sock_fd):
                raise
            got = self._step_over_urgent_mark(sock_fd)
        else:
            if not got and _at_urgent_mark(sock_fd):
                got = self._step_over_urgent_mark(sock_fd)
        self.read_pos += got
        return got

    def _step_over_urgent_mark(self, sock_fd: int) -> int:
        """splice(2) stops at TCP urgent data (the world sent MSG_OOB) and never passes it
        (EAGAIN, or 0 once the peer closed: a silently truncated stream). A plain read
        drops the urgent byte, as the copying path's `recv` does, and returns the next:
        that one goes into `fresh` by hand (it has room), and splicing resumes after it."""
        data = os.read(sock_fd, 1)
        if data:
            os.write(self.fresh.w, data)
        return len(data)

    # --- the link side ---------------------------------------------------------------

    def prepare(self, piece: HostSlice) -> tuple[bytes | None, int] | None:
        """Make `piece` ready to write: return the bytes of its part sent before (None if
        none) and how many of its bytes follow from `fresh` (`splice_out`); or None when
        it cannot be served (the frame must be dropped whole)."""
        self.queued_slices -= 1
        if self.closed:
            self._refuse(DropReason.FLOW_ENDED)
            return None
        start, end = piece.position, piece.position + piece.length
        try:
            if self.fresh_pos < self.tee_pos:  # the rest of a segment the link dropped
                self._drop_fresh(self.tee_pos - self.fresh_pos)
            self._release(piece.released)
            if start < self.store_pos or end > self.read_pos:
                logger.warning(
                    "spliced flow: bytes [%d, %d) asked, [%d, %d) held: frame dropped",
                    start, end, self.store_pos, self.read_pos,
                )  # fmt: skip
                self._refuse(DropReason.INTERNAL_ERROR)
                return None
            old = self._old_bytes(start, end) if start < self.tee_pos else None
            fresh = 0
            if end > self.tee_pos:
                if start > self.tee_pos:  # bytes the stack sent in frames the link dropped
                    self._skip(start - self.tee_pos)
                fresh = end - self.tee_pos
                self._tee(fresh)
            if not self.queued_slices and self._release_wanted >= 0:
                self._release(self._release_wanted, force=True)
                self._release_wanted = -1
        except OSError as exc:
            self._break(exc)
            return None
        if not self.queued_slices and self.on_drained is not None:
            self.on_drained()
        return old, fresh

    def release(self, upto: int) -> None:
        """Let go of every byte before `upto` (all acknowledged, and the stack holds no
        span of this flow any more): at once, or after the frames still queued in the
        link writer (a queued resend may need them)."""
        if self.closed:
            return
        if self.queued_slices:
            self._release_wanted = max(self._release_wanted, upto)
            return
        try:
            self._release(upto, force=True)
        except OSError as exc:
            self._break(exc)

    def splice_out(self, fd: int, n: int) -> int:
        """Splice up to `n` prepared bytes from `fresh` into `fd`; return how many went.

        Raises:
            OSError: `fd` failed, or the rest of the frame was lost.
        """
        try:
            if self.closed:  # mid-frame: the rest was read out (`close`)
                if not self.leftover:
                    raise OSError(errno.EIO, "the rest of a spliced frame is lost")
                went = os.write(fd, self.leftover[:n])
                del self.leftover[:went]
                return went
            went = os.splice(self.fresh.r, fd, n, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return 0
        self.fresh_pos += went
        if went:
            self._fresh_drained()
        return went

    def _fresh_drained(self) -> None:
        if self.waiting_for_room and not _pipe_full(self.fresh.w):  # a slot is free
            self.waiting_for_room = False
            if self.on_room is not None:
                self.on_room()

    # --- inside -----------------------------------------------------------------------

    def _release(self, upto: int, *, force: bool = False) -> None:
        """Let go of bytes before `upto` (acknowledged): from `store` at once, from the
        kept pipes in batches, or all with `force` (closing each emptied pipe but the
        last)."""
        upto = min(upto, self.tee_pos)
        drop = min(upto - self.store_pos, len(self.store))
        if drop > 0:
            del self.store[:drop]
            self.store_pos += drop
        kept = self.kept
        if self.store or (upto - kept[0].start < RELEASE_BATCH and not force):
            return
        while kept[0].start < upto:
            pipe = kept[0]
            n = min(upto, pipe.end) - pipe.start
            self._discard(pipe.r, n)
            pipe.start += n
            if pipe.start < pipe.end or len(kept) == 1:
                break
            kept.pop(0).close()  # the next one's overlap with it goes in the next round
        self.store_pos = upto

    def _old_bytes(self, start: int, end: int) -> bytes:
        """Bytes [start, min(end, tee_pos)), sent before: read the kept pipes out."""
        self._read_kept()
        return bytes(self.store[start - self.store_pos : min(end, self.tee_pos) - self.store_pos])

    def _read_kept(self) -> None:
        """Read every kept pipe into `store`, closing all but an empty last one."""
        kept = self.kept
        for pipe in kept:
            overlap = self.store_end - pipe.start
            if overlap > 0:
                self._discard(pipe.r, overlap)
                pipe.start += overlap
            while pipe.start < pipe.end:
                chunk = os.read(pipe.r, pipe.end - pipe.start)
                if not chunk:
                    raise OSError(errno.EIO, "kept pipe ended early")
                self.store += chunk
                pipe.start += len(chunk)
        for pipe in kept[:-1]:
            pipe.close()
        del kept[:-1]

    def _tee(self, n: int) -> None:
        """Add `fresh`'s first `n` bytes (from `tee_pos`) to the kept pipes."""
        last = self.kept[-1]
        got = self._tee_once(last, n)
        if got < n:  # full: a new pipe (or the store) takes all n again
            try:
                pipe = _Pipe(self.tee_pos, self.pipe_size)
            except OSError as exc:
                logger.debug("spliced flow: no new pipe (%s): copying what is in flight", exc)
                self._read_kept()  # `got` bytes past tee_pos included: they go again
                if got:
                    del self.store[len(self.store) - got :]
                pipe = self.kept[-1]
                pipe.start = pipe.end = self.tee_pos
            else:
                self.kept.append(pipe)
            if self._tee_once(pipe, n) != n:
                raise OSError(errno.EIO, "cannot tee into an empty pipe")
        self.tee_pos += n

    def _tee_once(self, pipe: _Pipe, n: int) -> int:
        assert _tee is not None
        got = _tee(self.fresh.r, pipe.w, n, os.SPLICE_F_NONBLOCK)
        if got < 0:
            code = ctypes.get_errno()
            if code == errno.EAGAIN:
                return 0
            raise OSError(code, os.strerror(code))
        pipe.end += got
        return int(got)

    def _skip(self, n: int) -> None:
        """Move `n` bytes from `fresh` to `kept` (they count as sent)."""
        self._tee(n)
        self._drop_fresh(n)

    def _drop_fresh(self, n: int) -> None:
        """Drop the first `n` bytes of `fresh` (`kept` has them)."""
        self._discard(self.fresh.r, n)
        self.fresh_pos += n
        self._fresh_drained()

    def _discard(self, fd: int, n: int) -> None:
        """Drop the first `n` bytes of a pipe."""
        sink = _discard_fd()
        while n > 0:
            went = os.splice(fd, sink, n, flags=SPLICE_FLAGS)
            if not went:
                raise OSError(errno.EIO, "pipe ended early")
            n -= went

    def _refuse(self, reason: DropReason) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)

    def _break(self, exc: OSError) -> None:
        logger.warning("spliced flow: pipe failed: %s (the flow is reset)", exc)
        self.close()
        if self.on_broken is not None:
            self.on_broken(exc)

    def close(self) -> None:
        """Release the pipes (idempotent); later slices are refused. The rest of a frame
        the link writer is splicing out is read out first (`leftover`): the link's
        framing never breaks."""
        if self.closed:
            return
        self.closed = True
        self.store = bytearray()
        try:
            while len(self.leftover) < self.tee_pos - self.fresh_pos:
                chunk = os.read(self.fresh.r, self.tee_pos - self.fresh_pos - len(self.leftover))
                if not chunk:
                    break
                self.leftover += chunk
        except OSError as exc:
            logger.debug("spliced flow: cannot read the rest of a frame: %s", exc)
        self.fresh.close()
        for pipe in self.kept:
            pipe.close()
        self.kept = []


def _at_urgent_mark(fd: int) -> bool:
    """True when a TCP socket's next byte is its urgent mark (SIOCATMARK)."""
    try:
        return bool(_INT.unpack(fcntl.ioctl(fd, _SIOCATMARK, b"\0\0\0\0"))[0])
    except OSError:
        return False


def _pipe_full(fd: int) -> bool:
    """True when a pipe's write end has no free slot (it holds pieces, not bytes)."""
    poller = select.poll()  # (not select(): descriptors past 1024 are common here)
    poller.register(fd, select.POLLOUT)
    return not poller.poll(0)

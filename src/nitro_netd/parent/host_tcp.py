"""Host TCP sockets for the netstack's TCP flows.

Theory of operation
-------------------
One non-blocking socket per flow, driven by `loop.add_reader` / `add_writer` callbacks
(no task per flow, no stream objects: a flow costs a socket and a small object).

* connect: `connect_ex`, then wait for writability or the flow's timeout; the outcome is
  `TcpConnected` or `TcpFailed(errno)`. A peer on this machine (the parent's loopback)
  is usually connected, or refused, inside `connect_ex` already: a zero-timeout poll sees
  it and the outcome is posted at the next loop turn, with no watch or timer to set up.
* enclave -> host: `TcpSend` chunks are written at once where the kernel takes them (one
  ``sendmsg``, straight from the enclave's frames: they are views valid only during this
  flush); the rest is copied into the flow's `pending` buffer until the socket is
  writable. Above `HIGH_WATER` pending bytes the stack is told `TcpWriteBlocked` (it stops
  opening the enclave's window) and below `LOW_WATER` `TcpWriteUnblocked`. A `TcpShutdown`
  or a graceful `TcpClose` takes effect only after `pending` is written: no byte is lost.
* host -> enclave: each readable callback does one `recv` of up to `HostTcp.read_size`
  bytes and posts `TcpData` (or `TcpEof`). The size follows the link (`read_size_for`):
  1 MiB when segments to the enclave are large, 256 KiB when they are MTU 1500-sized (a
  bigger batch of small segments only makes the link burstier). Reading stops while the
  stack asks (`TcpPauseReading`, the enclave is slow) or while the link to the enclave is
  backed up (`set_link_paused`).
* splicing: a flow is *bulk* while it reads `SPLICE_AFTER` bytes or more at a time, at
  least once per `SPLICE_IDLE` (a splicing flow: any read, as it fills only what its pipe
  has room for). On a link that allows it (`splice_enabled`: checksum offload, no capture,
  large segments) a bulk flow's later reads are spliced into a `SpliceBuffer` (splice.py)
  and posted as `HostSpan`s, the bytes going to the link without a copy through Python,
  but only while at most `splice_limit` flows are bulk (`SPLICE_FLOWS` by default: all
  but a flood of downloads). A splicing flow that finds more than that, the others
  having read `STOP_AFTER` bytes as bulk (a short fetch beside it does not count), goes
  back to copying for good (`splice_stops`); its spans already queued stay ahead of the
  copied bytes and its buffer serves them until acknowledged, then it is closed
  (`close_if_released`). Otherwise the buffer outlives the socket until the stack closes
  the flow (`TcpClose`): a failed host socket's last bytes still go out. `bulk` is kept in
  the order of the flows' last reads, so forgetting idle ones costs nothing per read.
  Measured in the simulator, against copying: one spliced stream costs the daemon 40 %
  less CPU per byte; 8, 16, 32, 64 and 128 spliced streams carry 11, 14, 19, 27 and 52 %
  more in sum. (Before the daemon's end of a unix link had its large buffers, eight
  spliced streams were 10-15 % slower than copying ones: that is why the limit was once
  one flow.) Where no pipes can be had a flow keeps copying.

Events caused by a command are posted with `call_soon`, never from inside `execute()`,
so the stack is never re-entered while the bridge is draining it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from nitro_netd.frames.errors import DropReason
from nitro_netd.netstack.events import (
    FlowId,
    HostEvent,
    TcpClose,
    TcpConnect,
    TcpConnected,
    TcpData,
    TcpEof,
    TcpFailed,
    TcpPauseReading,
    TcpRelease,
    TcpResumeReading,
    TcpSend,
    TcpShutdown,
    TcpWriteBlocked,
    TcpWriteUnblocked,
)
from nitro_netd.netstack.spans import HostSpan
from nitro_netd.parent.host import PostEvent, ThrottledWarning, descriptor_hint
from nitro_netd.parent.splice import SpliceBuffer

logger = logging.getLogger(__name__)

READ_SIZE_LARGE: Final = 1 << 20
READ_SIZE_SMALL: Final = 256 << 10
LARGE_SEGMENTS_MTU: Final = 16384
"""From this MTU up, segments to the enclave count as large."""
HIGH_WATER: Final = 4 << 20
LOW_WATER: Final = 1 << 20
MAX_SEND_CHUNKS: Final = 64
"""More chunks than this (a batch of tiny segments) are joined into one before sending,
far below the kernel's limit of 1024 buffers per ``sendmsg``."""
LINGER_TIMEOUT: Final = 60.0
"""How long a gracefully closed socket may take to write its last bytes."""
_LINGER_ABORT: Final = struct.pack("ii", 1, 0)
KEEPALIVE_IDLE: Final = 60
"""Seconds of silence on a host socket before the kernel probes its peer..."""
KEEPALIVE_INTERVAL: Final = 15
KEEPALIVE_COUNT: Final = 4
"""...every 15 s, 4 times: a dead peer fails its flow two minutes after it went quiet."""
SPLICE_AFTER: Final = 128 << 10
"""A read this large marks a bulk flow: its later reads may be spliced."""
SPLICE_IDLE: Final = 1.0
"""A bulk flow that read no more for this long is no longer bulk (an idle or chatty
keep-alive connection that once downloaded must not keep later downloads from splicing)."""
STOP_AFTER: Final = 4 << 20
"""Bytes another flow must have read as bulk before a splicing flow gives way to it."""
SPLICE_FLOWS: Final = 1024
"""The default `HostTcp.splice_limit` (--splice-flows): every bulk flow splices, up to this
many at once."""


@dataclass(slots=True)
class BulkReads:
    """When a bulk flow last read, and how much it read since it became bulk."""

    last: float
    bytes: int = 0


class HostTcpFlow:
    """The host socket of one flow and its unwritten bytes."""

    def __init__(self, owner: HostTcp, flow: FlowId, sock: socket.socket) -> None:
        self.owner = owner
        self.flow = flow
        self.sock = sock
        self.fd = sock.fileno()
        self.connected = False
        self.reading = False
        self.paused = False
        self.eof_seen = False
        self.pending = bytearray()
        self.writing = False
        self.blocked = False
        self.shutdown_wanted = False
        self.close_wanted = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.received = 0
        """Bytes read from the socket so far (the stream position of the next one)."""
        self.splice: SpliceBuffer | None = None
        self.splice_tried = False

    # --- connect ----------------------------------------------------------------------

    def start_connect(self, address: str, port: int, timeout: float) -> None:
        err = self.sock.connect_ex((address, port))
        if err not in (0, errno.EINPROGRESS):
            self.owner.post_soon(TcpFailed(self.flow, err))
            self.abort()
        elif _connect_ended(self.fd):
            # A peer on this machine (the parent's loopback, a local namespace): the kernel
            # ran the whole handshake inside connect(), so the outcome is known already.
            self.owner.loop.call_soon(self._on_connect_ended_at_once)
        else:
            self.owner.loop.add_writer(self.fd, self._on_connect_ready)
            self.writing = True
            self.timer = self.owner.loop.call_later(timeout, self._on_connect_timeout)

    def _on_connect_ended_at_once(self) -> None:
        if not self.closed:  # (the stack may have closed the flow in the meantime)
            self._on_connect_ready()

    def _on_connect_ready(self) -> None:
        self._stop_writing()
        self._cancel_timer()
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.abort()
            self.owner.post(TcpFailed(self.flow, err))
            return
        self.connected = True
        self.owner.post(TcpConnected(self.flow))
        if not self.closed:
            self.update_reading()
            self._flush_pending()

    def _on_connect_timeout(self) -> None:
        self.timer = None
        self.abort()
        self.owner.post(TcpFailed(self.flow, errno.ETIMEDOUT))

    # --- reading ----------------------------------------------------------------------

    def update_reading(self) -> None:
        """Register or unregister the reader to match the pause flags."""
        want = (
            self.connected
            and not self.closed
            and not self.eof_seen
            and not self.paused
            and not self.owner.link_paused
            and not (self.splice is not None and self.splice.waiting_for_room)
        )
        if want and not self.reading:
            self.owner.loop.add_reader(self.fd, self._on_readable)
        elif not want and self.reading:
            self.owner.loop.remove_reader(self.fd)
        self.reading = want

    def _on_readable(self) -> None:
        if self.splice is not None:
            if not self.owner.must_stop_splicing(self.flow):
                self._splice_in(self.splice)
                return
            self._stop_splicing()
        try:
            data = self.sock.recv(self.owner.read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        if not data:
            self._on_eof()
            return
        self.received += len(data)
        self.owner.post(TcpData(self.flow, data))
        self.owner.note_read(self.flow, len(data), splicing=False)
        if len(data) >= SPLICE_AFTER and not self.splice_tried and self.owner.may_splice():
            self._start_splicing()

    def _on_eof(self) -> None:
        self.owner.forget_bulk(self.flow)  # done reading: no longer bulk
        self.eof_seen = True
        self.update_reading()
        self.owner.post(TcpEof(self.flow))

    def _splice_in(self, buffer: SpliceBuffer) -> None:
        try:
            n = buffer.fill(self.fd, self.owner.read_size)
        except (BlockingIOError, InterruptedError):
            if buffer.waiting_for_room:  # until the link writer takes some out
                self.update_reading()
            return
        except OSError as exc:
            self._fail(exc)
            return
        if not n:
            self._on_eof()
            return
        self.received += n
        self.owner.spliced_bytes += n
        self.owner.note_read(self.flow, n, splicing=True)
        self.owner.post(TcpData(self.flow, HostSpan(buffer, n)))

    def _start_splicing(self) -> None:
        self.splice_tried = True
        if self.closed:
            return
        try:
            buffer = SpliceBuffer(self.received)
        except OSError as exc:
            self.owner.splice_warning.warn(
                "flow %d: cannot splice (copying instead): %s%s",
                self.flow,
                exc,
                descriptor_hint(exc),
            )
            return
        buffer.on_room = self.update_reading
        buffer.on_broken = self._on_splice_broken
        buffer.on_refused = self.owner.count_refused
        self.splice = buffer
        self.owner.splice_buffers[self.flow] = buffer
        self.owner.spliced_flows += 1
        logger.debug("flow %d: splicing from byte %d", self.flow, self.received)

    def _stop_splicing(self) -> None:
        """More flows are bulk than may splice: copy from now on, for good. The buffer
        stays in `splice_buffers` for the spans already posted, until it holds nothing
        (`HostTcp.close_if_released`: now, at `TcpRelease`, or once its last queued frame
        went) or the stack closes the flow."""
        buffer, self.splice = self.splice, None
        assert buffer is not None
        owner, flow = self.owner, self.flow

        def drained() -> None:  # (called inside the link writer's prepare: look after it)
            owner.loop.call_soon(owner.close_if_released, flow, buffer)

        buffer.on_drained = drained
        owner.close_if_released(flow, buffer)
        self.owner.splice_stops += 1
        logger.debug("flow %d: copying from byte %d (other bulk flows)", self.flow, self.received)

    def _on_splice_broken(self, exc: OSError) -> None:
        """The pipes failed: the bytes they held are lost, so the flow is reset."""
        self.abort()
        self.owner.post_soon(TcpFailed(self.flow, exc.errno or errno.EIO, data_lost=True))

    # --- writing ----------------------------------------------------------------------

    def send(self, chunks: tuple[bytes | memoryview, ...]) -> None:
        """Write `chunks` (views valid only during this call), keeping a copy of the rest."""
        if self.pending or not self.connected:
            for chunk in chunks:
                self.pending += chunk
        else:
            if len(chunks) > MAX_SEND_CHUNKS:
                chunks = (b"".join(chunks),)
            try:
                n = self.sock.sendmsg(chunks) if len(chunks) > 1 else self.sock.send(chunks[0])
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fail(exc, soon=True)
                return
            self._keep_unsent(chunks, n)
        if self.pending and self.connected and not self.writing:
            self.owner.loop.add_writer(self.fd, self._on_writable)
            self.writing = True
        if len(self.pending) > HIGH_WATER and not self.blocked:
            self.blocked = True
            self.owner.post_soon(TcpWriteBlocked(self.flow))

    def _keep_unsent(self, chunks: tuple[bytes | memoryview, ...], sent: int) -> None:
        """Copy what the kernel did not take (all but the first `sent` bytes) into `pending`."""
        for chunk in chunks:
            size = len(chunk)
            if sent >= size:
                sent -= size
                continue
            self.pending += memoryview(chunk)[sent:] if sent else chunk
            sent = 0

    def _flush_pending(self) -> None:
        if self.pending:
            if not self.writing:
                self.owner.loop.add_writer(self.fd, self._on_writable)
                self.writing = True
        else:
            self._after_drain()

    def _on_writable(self) -> None:
        try:
            n = self.sock.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        del self.pending[:n]
        if self.blocked and len(self.pending) < LOW_WATER:
            self.blocked = False
            # Through call_soon like TcpWriteBlocked, so the stack sees them in order.
            self.owner.post_soon(TcpWriteUnblocked(self.flow))
        if not self.pending and not self.closed:
            self._stop_writing()
            self._after_drain()

    def _after_drain(self) -> None:
        if self.shutdown_wanted and self.connected:
            self.shutdown_wanted = False
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                logger.debug("flow %d: shutdown: %s", self.flow, exc)
        if self.close_wanted:
            self._close_now(abort=False)

    def shutdown(self) -> None:
        self.shutdown_wanted = True
        if not self.pending:
            self._after_drain()

    def close(self) -> None:
        """Close once pending bytes are written (bounded by LINGER_TIMEOUT)."""
        self.close_wanted = True
        self.paused = True
        self.update_reading()
        if not self.pending or not self.connected:
            self._close_now(abort=False)
        else:
            self._cancel_timer()
            self.timer = self.owner.loop.call_later(LINGER_TIMEOUT, self.abort)

    # --- ends -------------------------------------------------------------------------

    def _fail(self, exc: OSError, *, soon: bool = False) -> None:
        code = exc.errno or errno.EIO
        self.abort()
        event = TcpFailed(self.flow, code)
        if soon:
            self.owner.post_soon(event)
        else:
            self.owner.post(event)

    def abort(self) -> None:
        """Close at once; the peer sees RST if the connection was up."""
        self._close_now(abort=True)

    def _close_now(self, *, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.owner.forget_bulk(self.flow)
        self.update_reading()
        self._stop_writing()
        self._cancel_timer()
        if abort:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        self.sock.close()
        self.owner.forget(self)

    def _stop_writing(self) -> None:
        if self.writing:
            self.owner.loop.remove_writer(self.fd)
            self.writing = False

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class HostTcp:
    """Executes the netstack's TCP commands. Implements `HostSide`."""

    command_types = (
        TcpConnect,
        TcpSend,
        TcpShutdown,
        TcpClose,
        TcpPauseReading,
        TcpResumeReading,
        TcpRelease,
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        post_event: PostEvent,
        count_drop: Callable[[DropReason], None] | None = None,
    ) -> None:
        self.loop = loop
        self.post = post_event
        self.count_drop = count_drop
        self.flows: dict[FlowId, HostTcpFlow] = {}
        self.link_paused = False
        self.read_size = READ_SIZE_SMALL
        """Bytes per host socket read; set per link with `read_size_for`."""
        self.splice_enabled = False
        """Bulk flows may splice (set per link: checksum offload, no capture, large
        segments), while at most `splice_limit` flows are bulk."""
        self.splice_limit = SPLICE_FLOWS
        self.splice_buffers: dict[FlowId, SpliceBuffer] = {}
        """Every flow's buffer that ever spliced, until the stack closes the flow."""
        self.bulk: dict[FlowId, BulkReads] = {}
        """Each bulk flow's reads (until its end of stream or close), in the order of
        their last read; one idle for `splice_idle` seconds is no longer bulk."""
        self.settled = 0
        """Bulk flows that read `STOP_AFTER` bytes or more as bulk."""
        self.clock: Callable[[], float] = loop.time
        self.splice_idle = SPLICE_IDLE
        self.spliced_flows = 0
        """Flows that began splicing (a counter, for status)."""
        self.splice_stops = 0
        """Splicing flows that went back to copying (a counter, for status)."""
        self.spliced_bytes = 0
        """Bytes read by splicing (a counter, for status)."""
        self._socket_warning = ThrottledWarning(logger)
        self.splice_warning = ThrottledWarning(logger)

    def post_soon(self, event: HostEvent) -> None:
        """Post an event after the current drain of the stack (never re-entrantly)."""
        self.loop.call_soon(self.post, event)

    def execute(self, command: Any) -> None:
        """Carry out one TCP command."""
        if isinstance(command, TcpConnect):
            self._connect(command)
            return
        if isinstance(command, TcpRelease):
            if (buffer := self.splice_buffers.get(command.flow)) is not None:
                buffer.release(command.position)
                self.close_if_released(command.flow, buffer)
            return
        if isinstance(command, TcpClose) and (
            buffer := self.splice_buffers.pop(command.flow, None)
        ):
            buffer.close()
        flow = self.flows.get(command.flow)
        if flow is None:
            return
        if isinstance(command, TcpSend):
            flow.send(command.chunks)
        elif isinstance(command, TcpShutdown):
            flow.shutdown()
        elif isinstance(command, TcpClose):
            flow.abort() if command.reset else flow.close()
        elif isinstance(command, TcpPauseReading | TcpResumeReading):
            flow.paused = isinstance(command, TcpPauseReading)
            flow.update_reading()

    def _connect(self, command: TcpConnect) -> None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            self._socket_warning.warn(
                "flow %d: cannot open a socket: %s%s", command.flow, exc, descriptor_hint(exc)
            )
            self.post_soon(TcpFailed(command.flow, exc.errno or errno.EMFILE))
            return
        tune_host_socket(sock)
        flow = HostTcpFlow(self, command.flow, sock)
        self.flows[command.flow] = flow
        flow.start_connect(str(command.address), command.port, command.timeout)

    def adopt(self, flow_id: FlowId, sock: socket.socket) -> None:
        """Take an accepted client socket as a flow; it is read once the stack resumes it."""
        tune_host_socket(sock)
        flow = HostTcpFlow(self, flow_id, sock)
        flow.connected = True
        flow.paused = True
        self.flows[flow_id] = flow

    def forget(self, flow: HostTcpFlow) -> None:
        """A flow's socket was closed."""
        if self.flows.get(flow.flow) is flow:
            del self.flows[flow.flow]

    def set_link_paused(self, paused: bool) -> None:
        """Stop (or restart) reading every host socket while the link is backed up."""
        if paused == self.link_paused:
            return
        self.link_paused = paused
        for flow in list(self.flows.values()):
            flow.update_reading()

    def close_if_released(self, flow_id: FlowId, buffer: SpliceBuffer) -> None:
        """Close the buffer of a flow no longer splicing into it once it holds nothing:
        the enclave acknowledged its spans and no queued frame needs it."""
        if self.splice_buffers.get(flow_id) is not buffer:
            return  # (closed already, with the flow)
        flow = self.flows.get(flow_id)
        if (flow is None or flow.splice is not buffer) and buffer.holds_nothing:
            buffer.close()
            del self.splice_buffers[flow_id]

    def note_read(self, flow: FlowId, n: int, *, splicing: bool) -> None:
        """A flow read `n` bytes: a large read makes it bulk and keeps it so; for a
        splicing flow any read does (its fills are what its pipe has room for)."""
        reads = self.bulk.get(flow)
        if n < SPLICE_AFTER and not splicing:
            if reads is not None:
                self._add_bulk_bytes(reads, n)  # counted, but not a sign of life
            return
        if reads is None:
            reads = BulkReads(self.clock())
        else:
            del self.bulk[flow]  # (re-inserted last: `bulk` stays in order of last reads)
            reads.last = self.clock()
        self.bulk[flow] = reads
        self._add_bulk_bytes(reads, n)

    def _add_bulk_bytes(self, reads: BulkReads, n: int) -> None:
        if reads.bytes < STOP_AFTER <= reads.bytes + n:
            self.settled += 1
        reads.bytes += n

    def forget_bulk(self, flow: FlowId) -> None:
        """`flow` is no longer bulk (idle, done reading or closed)."""
        reads = self.bulk.pop(flow, None)
        if reads is not None and reads.bytes >= STOP_AFTER:
            self.settled -= 1

    def bulk_flows(self) -> int:
        """How many flows are bulk now (forgetting those gone idle)."""
        self._forget_idle_bulk()
        return len(self.bulk)

    def _forget_idle_bulk(self) -> None:
        """Forget the flows that read nothing for `splice_idle` (oldest first: `bulk` is
        in order of last read); each is bulk again at its next large read."""
        since = self.clock() - self.splice_idle
        while self.bulk:
            flow, reads = next(iter(self.bulk.items()))
            if reads.last >= since:
                break
            self.forget_bulk(flow)

    def may_splice(self) -> bool:
        """Whether a bulk flow that just read may begin splicing."""
        return self.splice_enabled and self.bulk_flows() <= self.splice_limit

    def must_stop_splicing(self, flow: FlowId) -> bool:
        """Whether splicing `flow` must go back to copying: more than `splice_limit` flows
        are bulk, the others settled (a short fetch beside a download does not count)."""
        if len(self.bulk) <= self.splice_limit:
            return False
        self._forget_idle_bulk()
        reads = self.bulk.get(flow)
        others = self.settled - (reads is not None and reads.bytes >= STOP_AFTER)
        return others + 1 > self.splice_limit

    def count_refused(self, reason: DropReason) -> None:
        """A frame whose bytes a flow's `SpliceBuffer` held could not be written (the flow
        had ended, or a bug)."""
        if self.count_drop is not None:
            self.count_drop(reason)

    def close_all(self) -> None:
        """Abort every socket, release every pipe."""
        for flow in list(self.flows.values()):
            flow.abort()
        for buffer in self.splice_buffers.values():
            buffer.close()
        self.splice_buffers.clear()
        self.bulk.clear()
        self.settled = 0


def _connect_ended(fd: int) -> bool:
    """True when a non-blocking connect on `fd` has already succeeded or failed."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(0))


def tune_host_socket(sock: socket.socket) -> None:
    """Non-blocking, no Nagle (the enclave's kernel already coalesces), and keepalive: a
    world peer that vanished (host down, NAT entry gone) fails the flow after
    `KEEPALIVE_IDLE` + `KEEPALIVE_COUNT` x `KEEPALIVE_INTERVAL` seconds of silence
    instead of holding it, its socket and the enclave's connection for ever. (The
    enclave's own keepalives are answered by the stack, which is its peer.)"""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def read_size_for(mtu: int, segmentation_offload: bool) -> int:
    """Return the host read size for a link: large when its TCP segments are large."""
    if segmentation_offload or mtu >= LARGE_SEGMENTS_MTU:
        return READ_SIZE_LARGE
    return READ_SIZE_SMALL

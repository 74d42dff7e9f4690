"""The frame pump: TAP ⇄ link stream, one process per direction.

Theory of operation
-------------------
A session hands the pump a TAP descriptor (any descriptor that keeps message boundaries
works: tests use a ``SOCK_SEQPACKET`` socketpair) and a connected, handshaken link socket.
`run_pump` forks two children, which share both descriptors and no GIL:

* **tap → link** reads each frame with ``os.readv`` straight into a batch buffer, right
  after room reserved for its length prefix, which is then filled in with
  `link.pack_length`. Small frames are coalesced while the TAP has more queued, up to
  `COALESCE_LIMIT` bytes per send; a frame that does not fit an empty batch goes alone (a
  Debian 12 passt loses frame boundaries otherwise). The batch is flushed as soon as the TAP
  has nothing more, so coalescing adds no latency. The TAP descriptor is non-blocking for
  this; an idle TAP is waited on with ``poll``.
* **link → tap** receives into a `link.FrameDecoder`'s free space (``recv_into``, up to a
  MiB at a time, non-blocking per call) and writes each decoded frame with one
  ``os.write``. An idle link is waited on with ``poll``, never in a blocking ``recv``,
  whose sleeper the other child's traffic would wake on every frame. A frame the TAP
  refuses is dropped and counted; a bad length from the parent (`LinkError`) ends the
  session.

With ``vnet_hdr`` (a real TAP, opened with ``IFF_VNET_HDR``) each frame read from the TAP
starts with a 10-byte ``virtio_net_hdr``: the same ``readv`` puts it into a scratch buffer,
and the frame goes on unchanged (its checksum may be partial when offload is on: the parent
then does not check it). A frame with a GSO type is dropped and counted unless segmentation
offload is on (``gso_size``), and then only a TCP/IPv4 one passes, as one frame of up to the
framing's limit. Each frame written into the TAP gets a header in the same ``os.writev``:
all zeros, or with ``csum_offload`` a ``NEEDS_CSUM`` one for IPv4 TCP segments, which is a
GSO one (`vnet.gso_header`) for a segment longer than ``gso_size``.

No per-byte Python work happens on either path. When either child ends (EOF, error, bad
frame), the parent stops the other with SIGTERM and returns the first child's reason; the
same happens when the agent's stop descriptor becomes readable. Each child reports one
line: ``reason<TAB>frames<TAB>bytes<TAB>dropped``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from nitro_netd.enclave import _process
from nitro_netd.enclave.handshake import REPLY_PREFIX
from nitro_netd.enclave.tap import VNET_HDR_SIZE
from nitro_netd.enclave.vnet import (
    CSUM_HEADERS,
    GSO_ACCEPTED_MASK,
    MIN_TCP_FRAME,
    ZERO_HEADER,
    gso_header,
)
from nitro_netd.link import MIN_FRAME, FrameDecoder, LinkError, LinkProtocol, pack_length

COALESCE_LIMIT: Final = 32 * 1024
"""Most bytes per link send when coalescing small frames (PERF-NOTES: passt)."""
RECEIVE_CAPACITY: Final = 1 << 20
"""The link receive buffer: one ``recv_into`` can take up to this much."""
STOP_GRACE: Final = 2.0
"""Seconds a stopped child gets to report before it is killed."""
_TAP_DROP_ERRNOS: Final = frozenset(
    {errno.EIO, errno.EINVAL, errno.ENOBUFS, errno.ENOMEM, errno.EMSGSIZE}
)
"""Errors on writing one frame into the TAP that drop that frame, not the session."""


class Sender(Protocol):
    """What the tap → link direction needs of the link socket."""

    def sendall(self, data: memoryview, /) -> None: ...


@dataclass(slots=True)
class DirectionStats:
    """What one direction moved before it ended."""

    frames: int = 0
    bytes: int = 0
    dropped: int = 0

    def __str__(self) -> str:
        return f"{self.frames} frames, {self.bytes} bytes, {self.dropped} dropped"


@dataclass(frozen=True, slots=True)
class PumpReport:
    """How one direction ended."""

    reason: str
    stats: DirectionStats

    def encode(self) -> str:
        """Return the one-line form a child sends to its parent."""
        s = self.stats
        return f"{self.reason}\t{s.frames}\t{s.bytes}\t{s.dropped}"

    @classmethod
    def decode(cls, line: str) -> PumpReport:
        """Parse `encode`'s output; any other text is kept whole as the reason."""
        parts = line.rsplit("\t", 3)
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
            frames, nbytes, dropped = (int(p) for p in parts[1:])
            return cls(parts[0], DirectionStats(frames, nbytes, dropped))
        return cls(line or "ended without a report", DirectionStats())


@dataclass(frozen=True, slots=True)
class PumpResult:
    """How a session's pump ended: the first direction's reason, and both reports."""

    reason: str
    tap_to_link: PumpReport
    link_to_tap: PumpReport


def pump_tap_to_link(
    tap_fd: int,
    sock: Sender,
    protocol: LinkProtocol,
    stats: DirectionStats,
    *,
    max_frame: int | None = None,
    coalesce: int = COALESCE_LIMIT,
    vnet_hdr: bool = False,
    tso: bool = False,
) -> str:
    """Move frames from a non-blocking TAP descriptor to the link until one side ends.

    With `vnet_hdr`, each read starts with a ``virtio_net_hdr``, which is stripped. With
    `tso` too, TCP/IPv4 super-segments pass (frames with any other GSO type are dropped).

    Returns:
        Why it stopped ("tap closed").

    Raises:
        OSError: reading the TAP or sending on the link failed.
    """
    header = protocol.header_size
    limit = min(max_frame or protocol.max_frame, protocol.max_frame)
    read_size = limit + 1  # one more than allowed, so an oversized frame is seen
    buffer = bytearray(coalesce + header + read_size)
    view = memoryview(buffer)
    poller = select.poll()
    poller.register(tap_fd, select.POLLIN)
    readv, sendall = os.readv, sock.sendall
    # The virtio-net header lands in `scratch`; its gso_type byte stays 0 without one.
    scratch = bytearray(VNET_HDR_SIZE)
    gso_refused = GSO_ACCEPTED_MASK if tso else 0xFF
    vnet = VNET_HDR_SIZE if vnet_hdr else 0
    buffers: list[bytearray | memoryview] = [scratch, view] if vnet_hdr else [view]
    last = len(buffers) - 1
    offset = 0
    while True:
        start = offset + header
        buffers[last] = view[start : start + read_size]
        try:
            n = readv(tap_fd, buffers) - vnet
        except BlockingIOError:
            if offset:
                sendall(view[:offset])
                offset = 0
            poller.poll()
            continue
        if not MIN_FRAME <= n <= limit or scratch[1] & gso_refused:
            if n == -vnet:
                if offset:
                    sendall(view[:offset])
                return "tap closed"
            stats.dropped += 1  # a runt, a giant, or a GSO frame
            continue
        stats.frames += 1
        stats.bytes += n
        pack_length(protocol, buffer, offset, n)
        end = start + n
        if end <= coalesce:
            offset = end
        elif offset and end - offset <= coalesce:
            sendall(view[:offset])  # the batch is full: send it, this frame starts the next
            view[: end - offset] = view[offset:end]
            offset = end - offset
        else:
            if offset:
                sendall(view[:offset])
            sendall(view[offset:end])  # a large frame goes alone
            offset = 0


def pump_link_to_tap(
    sock: socket.socket,
    tap_fd: int,
    decoder: FrameDecoder,
    stats: DirectionStats,
    *,
    vnet_hdr: bool = False,
    csum_offload: bool = False,
    gso_size: int = 0,
) -> str:
    """Move frames from the link to the TAP until one side ends.

    With `vnet_hdr`, each frame is written behind a ``virtio_net_hdr``: all zeros, or with
    `csum_offload` one marking an IPv4 TCP segment's checksum as partial, and with
    `gso_size` too, a GSO one for a segment carrying more than `gso_size` bytes.

    Returns:
        Why it stopped ("parent closed the link").

    Raises:
        LinkError: the parent sent a bad frame length.
        OSError: receiving on the link or writing the TAP failed.
    """
    if vnet_hdr:
        return _pump_link_to_vnet_tap(sock, tap_fd, decoder, stats, csum_offload, gso_size)
    receive, write = _link_receiver(sock), os.write
    while True:
        frame = decoder.maybe_next_frame()
        while frame is not None:
            try:
                write(tap_fd, frame)
                stats.frames += 1
                stats.bytes += len(frame)
            except OSError as exc:
                _handle_tap_write_error(tap_fd, (frame,), exc, stats)
            frame = decoder.maybe_next_frame()
        n = receive(decoder.get_buffer())
        if not n:
            return "parent closed the link"
        decoder.buffer_updated(n)


def _pump_link_to_vnet_tap(
    sock: socket.socket,
    tap_fd: int,
    decoder: FrameDecoder,
    stats: DirectionStats,
    csum_offload: bool,
    gso_size: int = 0,
) -> str:
    """`pump_link_to_tap` for a TAP that takes a virtio-net header before each frame."""
    receive, writev = _link_receiver(sock), os.writev
    zero, csum_headers, min_tcp = ZERO_HEADER, CSUM_HEADERS, MIN_TCP_FRAME
    gso_above = gso_size + MIN_TCP_FRAME if gso_size else 1 << 30
    while True:
        frame = decoder.maybe_next_frame()
        while frame is not None:
            # The inlined form of vnet.header_for: IPv4 (0x0800), TCP (6), not a fragment.
            if (
                csum_offload
                and len(frame) >= min_tcp
                and frame[23] == 6
                and frame[12] == 8
                and frame[13] == 0
                and not (frame[20] & 0x3F or frame[21])
            ):
                if len(frame) > gso_above:
                    buffers = (gso_header(frame, gso_size), frame)
                else:
                    buffers = (csum_headers[frame[14]], frame)
            else:
                buffers = (zero, frame)
            try:
                writev(tap_fd, buffers)
                stats.frames += 1
                stats.bytes += len(frame)
            except OSError as exc:
                _handle_tap_write_error(tap_fd, buffers, exc, stats)
            frame = decoder.maybe_next_frame()
        n = receive(decoder.get_buffer())
        if not n:
            return "parent closed the link"
        decoder.buffer_updated(n)


def _link_receiver(sock: socket.socket) -> Callable[[memoryview], int]:
    """``recv_into`` for the link that waits in ``poll``, never in a blocking ``recv``.

    A task blocked in a stream socket's ``recv`` sleeps on the socket's one wait queue and
    is woken by *every* event on it, including the write-space wake-up each time the parent
    reads a frame the other child sent. A ``poll`` for ``POLLIN`` filters those out, which
    saves a cross-CPU wake-up per enclave→parent frame: a round trip's latency. The socket
    stays blocking (the other child shares its file status flags); the receive is
    non-blocking per call (``MSG_DONTWAIT``).
    """
    recv_into, dontwait = sock.recv_into, socket.MSG_DONTWAIT
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    wait = poller.poll

    def receive(buffer: memoryview) -> int:
        while True:
            try:
                return recv_into(buffer, 0, dontwait)
            except BlockingIOError:
                wait()

    return receive


def _handle_tap_write_error(
    tap_fd: int, buffers: Sequence[bytes | memoryview], exc: OSError, stats: DirectionStats
) -> None:
    """Retry a frame the TAP could not take yet; drop one it refuses; raise otherwise.

    `buffers` is the frame, behind its virtio-net header if the TAP takes one.
    """
    frame = buffers[-1]
    if isinstance(exc, BlockingIOError):
        poller = select.poll()
        poller.register(tap_fd, select.POLLOUT)
        while True:
            poller.poll()
            try:
                os.writev(tap_fd, buffers)
            except BlockingIOError:
                continue
            except OSError as again:
                exc = again
                break
            stats.frames += 1
            stats.bytes += len(frame)
            return
    if exc.errno not in _TAP_DROP_ERRNOS:
        raise exc
    stats.dropped += 1


def run_tap_to_link(
    tap_fd: int,
    sock: socket.socket,
    protocol: LinkProtocol,
    max_frame: int | None = None,
    *,
    vnet_hdr: bool = False,
    tso: bool = False,
) -> PumpReport:
    """Run the tap → link direction to its end and say why it ended."""
    stats = DirectionStats()
    try:
        reason = pump_tap_to_link(
            tap_fd, sock, protocol, stats, max_frame=max_frame, vnet_hdr=vnet_hdr, tso=tso
        )
    except _process.Stopped:
        reason = "stopped"
    except OSError as exc:
        reason = f"tap→link: {exc.strerror or exc}"
    return PumpReport(reason, stats)


def refuse_late_reply(sock: socket.socket, initial: bytes) -> bytes:
    """Return the stream's first bytes, unless they are a handshake reply that came late.

    The agent stops waiting for a reply after a moment (a stock gvproxy never sends one)
    and pumps. A daemon that was slow to answer (paused, swapping, its loop stalled) then
    sends ``HTTP/1.1 200`` into the frame stream, where "HT" reads as a valid length:
    every frame after it would be cut in the wrong place, silently. No frame starts with
    those bytes (a frame's length is followed by the enclave's MAC address).

    Raises:
        LinkError: the stream starts with a reply: the session must start again.
    """
    head = bytes(initial)
    while len(head) < len(REPLY_PREFIX) and REPLY_PREFIX.startswith(head):
        data = sock.recv(len(REPLY_PREFIX) - len(head))
        if not data:
            break
        head += data
    if head.startswith(REPLY_PREFIX):
        raise LinkError("the parent's handshake reply came after the agent stopped waiting")
    return head


def run_link_to_tap(
    sock: socket.socket,
    tap_fd: int,
    protocol: LinkProtocol,
    initial: bytes = b"",
    *,
    vnet_hdr: bool = False,
    csum_offload: bool = False,
    gso_size: int = 0,
    reply_overdue: bool = False,
) -> PumpReport:
    """Run the link → tap direction to its end and say why it ended."""
    stats = DirectionStats()
    decoder = FrameDecoder(protocol, capacity=RECEIVE_CAPACITY)
    try:
        decoder.receive_data(refuse_late_reply(sock, initial) if reply_overdue else initial)
        reason = pump_link_to_tap(
            sock,
            tap_fd,
            decoder,
            stats,
            vnet_hdr=vnet_hdr,
            csum_offload=csum_offload,
            gso_size=gso_size,
        )
    except _process.Stopped:
        reason = "stopped"
    except LinkError as exc:
        reason = f"bad frame from the parent: {exc}"
    except OSError as exc:
        reason = f"link→tap: {exc.strerror or exc}"
    return PumpReport(reason, stats)


def run_pump(
    tap_fd: int,
    sock: socket.socket,
    protocol: LinkProtocol,
    *,
    initial: bytes = b"",
    stop_fd: int | None = None,
    max_frame: int | None = None,
    vnet_hdr: bool = False,
    csum_offload: bool = False,
    gso_size: int = 0,
    reply_overdue: bool = False,
) -> PumpResult:
    """Pump frames both ways in two child processes until either direction ends.

    Args:
        tap_fd: the TAP (or any boundary-keeping descriptor); made non-blocking here.
        sock: the connected link socket, after the handshake.
        protocol: the link framing.
        initial: link bytes already received (frames that followed the handshake).
        stop_fd: becoming readable stops the pump (reason "agent stopping").
        max_frame: the largest frame read from the TAP (default: the framing's limit).
        vnet_hdr: the TAP's frames carry a ``virtio_net_hdr`` both ways (``IFF_VNET_HDR``).
        csum_offload: with `vnet_hdr`, mark enclave-bound IPv4 TCP segments ``NEEDS_CSUM``
            (the session agreed checksum offload with the parent).
        gso_size: with `csum_offload`, segmentation offload is on: TCP/IPv4 super-segments
            pass both ways (up to the framing's limit, whatever `max_frame`), and an
            enclave-bound one is cut by the enclave's kernel into pieces of this size.
        reply_overdue: the handshake stopped waiting for a reply: a late one ends the
            session (`refuse_late_reply`) instead of corrupting the frame stream.

    Returns:
        The reason of the direction that ended first, and both directions' reports.

    Raises:
        ValueError: `csum_offload` without `vnet_hdr`, or `gso_size` without `csum_offload`.
    """
    if csum_offload and not vnet_hdr:
        raise ValueError("checksum offload needs a TAP with virtio-net headers")
    if gso_size and not csum_offload:
        raise ValueError("segmentation offload needs checksum offload")
    tso = gso_size > 0
    if tso:
        max_frame = protocol.max_frame
    os.set_blocking(tap_fd, False)
    keep = (tap_fd, sock.fileno())
    out = _spawn_direction(
        "tap→link",
        lambda: run_tap_to_link(tap_fd, sock, protocol, max_frame, vnet_hdr=vnet_hdr, tso=tso),
        keep,
    )
    try:
        back = _spawn_direction(
            "link→tap",
            lambda: run_link_to_tap(
                sock,
                tap_fd,
                protocol,
                initial,
                vnet_hdr=vnet_hdr,
                csum_offload=csum_offload,
                gso_size=gso_size,
                reply_overdue=reply_overdue,
            ),
            keep,
        )
    except OSError:  # the first child must not outlive a failed second spawn
        _process.finish(out, STOP_GRACE)
        raise
    first, reason = _wait_first([out, back], stop_fd)
    reports = {first.name: PumpReport.decode(reason)} if first is not None else {}
    for child in (out, back):
        if child is not first:
            reports[child.name] = PumpReport.decode(_process.finish(child, STOP_GRACE))
    if first is not None:
        _process.finish(first, STOP_GRACE)
    reason = reports[first.name].reason if first is not None else "agent stopping"
    return PumpResult(reason, reports["tap→link"], reports["link→tap"])


def _spawn_direction(
    name: str, target: Callable[[], PumpReport], keep: tuple[int, ...]
) -> _process.Child:
    return _process.spawn(name, lambda: target().encode(), keep)


def _wait_first(
    children: list[_process.Child], stop_fd: int | None
) -> tuple[_process.Child | None, str]:
    """Wait until a child reports (or exits) or the stop descriptor fires."""
    watched = [child.report_fd for child in children]
    if stop_fd is not None:
        watched.append(stop_fd)
    ready, _, _ = select.select(watched, [], [])
    for child in children:
        if child.report_fd in ready:
            return child, _process.read_report(child, STOP_GRACE) or "ended without a report"
    return None, "agent stopping"

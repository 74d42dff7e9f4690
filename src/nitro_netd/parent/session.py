"""One link from an enclave agent, as an asyncio protocol.

Theory of operation
-------------------
A session starts in the *detect* phase: the first bytes tell the framing (`POST` for
gvproxy, a 32-bit length for QEMU). A gvproxy session then reads the HTTP head of the
``POST /connect`` request and answers it only if the agent asked (a stock gvforwarder
would read an answer as frames). From then on bytes are received straight into the
`FrameDecoder`'s buffer (`get_buffer`/`buffer_updated`, no copies) and every whole frame
is handed to the `LinkOwner` in order; after each read the owner flushes its output once,
so replies to a burst of frames leave in one write.

A protocol violation (first bytes of neither framing, a bad handshake, a frame length out
of bounds) closes this session with a logged reason; nothing else is affected. So does a
handshake begun and not completed within `HANDSHAKE_TIMEOUT` (a peer that has sent
nothing yet may be a quiet qemu-framed agent, which sends no request: it is checked
again one timeout later; the owner bounds how many wait at once). A session goes live (`on_link_up`, replacing any other) only
once its handshake is complete and its reply, if any, written.

Anyone who can reach the link listener can open connections that never become the link
(a port scanner, an HTTP probe): their end is logged through the owner's `not_live_log`,
at most one line per 10 s with a count of the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final, Protocol, cast

from nitro_netd.link import (
    HEADER_OFFLOAD,
    HEADER_WANT_REPLY,
    OFFLOAD_CSUM,
    OFFLOAD_TSO,
    FrameDecoder,
    HttpHeadReader,
    LinkError,
    LinkProtocol,
    build_connect_reply,
    check_connect_request,
    detect_protocol,
    format_offloads,
    parse_offloads,
)
from nitro_netd.netstack.output import Frame
from nitro_netd.parent.host import ThrottledWarning
from nitro_netd.parent.link_writer import LinkWriter
from nitro_netd.transport import tune_accepted_link_socket

logger = logging.getLogger(__name__)

_HANDSHAKE_CHUNK: Final = 4096
HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds a new connection has to finish its handshake before it is closed."""
LINK_READ_CAPACITY: Final = 4 << 20
"""The frame decoder's buffer: one read of the link takes up to this much, so a busy link
is handled in batches of megabytes, which many flows share (one host write and one ACK
per flow per batch: larger batches keep eight busy flows as cheap as one)."""


def not_live_log(clock: Callable[[], float] = time.monotonic) -> ThrottledWarning:
    """The throttled log for connections that end before becoming the link: one per
    listener (the owner's), shared by its sessions."""
    return ThrottledWarning(logger, clock=clock)


class LinkOwner(Protocol):
    """What a session reports to (the bridge)."""

    def on_link_up(self, session: LinkSession) -> None:
        """The handshake finished; frames may flow."""

    def on_frame(self, session: LinkSession, frame: memoryview) -> None:
        """One whole frame arrived (valid only during the call)."""

    def on_frames_done(self, session: LinkSession) -> None:
        """A read's worth of frames was delivered: flush output now."""

    def on_link_down(self, session: LinkSession, reason: str) -> None:
        """The session ended (EOF, error, protocol violation or replaced)."""

    def link_plan(self) -> Mapping[str, str]:
        """Headers describing the network plan, sent to agents that ask for a reply."""

    def offload_allowed(self) -> bool:
        """Whether this daemon agrees to checksum offload with agents that offer it."""

    def segmentation_allowed(self) -> bool:
        """Whether this daemon agrees to TCP segmentation offload (with checksum offload)."""

    def on_link_writable(self, session: LinkSession, writable: bool) -> None:
        """The link's write buffer crossed its high (False) or low (True) water mark."""


class LinkSession(asyncio.BufferedProtocol):
    """The daemon's side of one agent link."""

    def __init__(
        self, owner: LinkOwner, *, max_frame: int, not_live: ThrottledWarning | None = None
    ) -> None:
        self.owner = owner
        self.not_live = not_live or not_live_log()
        """Logs this session's end if it never went live (see the module docstring)."""
        self.max_frame = max_frame
        self.protocol: LinkProtocol | None = None
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._probe = bytearray(_HANDSHAKE_CHUNK)
        self._head = HttpHeadReader()
        self._prefix = b""
        self._decoder: FrameDecoder | None = None
        self._up = False
        self._writer: LinkWriter | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.checksum_offload = False
        """Agreed in the handshake: see `StackOutput.checksum_offload`."""
        self.segmentation_offload = False
        """Agreed in the handshake: frames up to the framing's limit (`link.OFFLOAD_TSO`)."""
        self.on_closed: Callable[[LinkSession], None] | None = None
        """Called once when the session ends, live or not (the owner's bookkeeping)."""

    # --- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.peer = _describe_peer(transport)
        logger.debug("link from %s: connected", self.peer)
        self._handshake_timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT, self._handshake_timed_out
        )

    def _handshake_timed_out(self) -> None:
        """A peer that started a handshake and never finished it must not hold a socket
        for ever. A peer that sent nothing yet may be a qemu-framed agent whose enclave is
        quiet (that framing has no request: its first bytes are its first frame)."""
        self._handshake_timer = None
        if self._up or self.closed:
            return
        if self._prefix or self.protocol is not None:
            self.close(f"no complete handshake within {HANDSHAKE_TIMEOUT:.0f} s")
        else:  # silent so far: look again later (a handshake begun then must end too)
            self._handshake_timer = asyncio.get_running_loop().call_later(
                HANDSHAKE_TIMEOUT, self._handshake_timed_out
            )

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._decoder is not None:
            return self._decoder.get_buffer()
        return memoryview(self._probe)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._decoder is None:
                self._handshake(bytes(self._probe[:nbytes]))
            else:
                self._decoder.buffer_updated(nbytes)
            if self._decoder is not None:
                self._deliver_frames(self._decoder)
        except LinkError as exc:
            self.close(f"protocol error: {exc}")
        except Exception:  # a bug behind the link: log it, never blame the agent for it
            logger.exception("link from %s: internal error while handling its input", self.peer)
            if not self._up:
                self.close("internal error during the handshake")

    def _on_writable(self, writable: bool) -> None:
        self.owner.on_link_writable(self, writable)

    def eof_received(self) -> bool:
        self.close("agent closed the link")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(f"link broken: {exc}" if exc else "link closed")

    # --- phases ------------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        if self.protocol is None:
            self._prefix += data
            self.protocol = detect_protocol(self._prefix)
            if self.protocol is None:
                return
            data, self._prefix = self._prefix, b""
        if self.protocol is LinkProtocol.QEMU:
            self._start_frames(data)
            return
        head = self._head.receive_data(data)
        if head is None:
            return
        check_connect_request(head)
        reply = b""
        if head.get(HEADER_WANT_REPLY) is not None:
            plan = dict(self.owner.link_plan())
            agreed = self._agree_offloads(parse_offloads(head.get(HEADER_OFFLOAD)))
            if agreed:
                plan[HEADER_OFFLOAD] = format_offloads(agreed)
            reply = build_connect_reply(plan)
        self._start_frames(self._head.rest, reply)

    def _agree_offloads(self, offered: frozenset[str]) -> set[str]:
        """Agree to what the agent offers and this daemon allows; TSO only with csum."""
        agreed: set[str] = set()
        if OFFLOAD_CSUM in offered and self.owner.offload_allowed():
            agreed.add(OFFLOAD_CSUM)
            self.checksum_offload = True
            if OFFLOAD_TSO in offered and self.owner.segmentation_allowed():
                agreed.add(OFFLOAD_TSO)
                self.segmentation_offload = True
                if self.protocol is not None:
                    self.max_frame = self.protocol.max_frame
        return agreed

    def _start_frames(self, rest: bytes, reply: bytes = b"") -> None:
        assert self.protocol is not None
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        try:
            tune_accepted_link_socket(sock)
        except OSError as exc:
            logger.warning("link from %s: cannot enlarge its socket buffers: %s", self.peer, exc)
        self._writer = LinkWriter(
            asyncio.get_running_loop(), sock.fileno(), self.protocol, self._on_writable
        )
        self._writer.on_error = lambda exc: self.close(f"write failed: {exc}")
        if reply:
            self._writer.write_raw(reply)
            if self.closed:  # the reply could not be written: the link is already gone
                return
        self._decoder = FrameDecoder(
            self.protocol, max_frame=self.max_frame, capacity=LINK_READ_CAPACITY
        )
        self._decoder.receive_data(rest)
        self._up = True
        self._cancel_handshake_timer()
        logger.info(
            "link from %s: up (%s framing, checksum offload %s, segmentation offload %s)",
            self.peer,
            self.protocol.value,
            "on" if self.checksum_offload else "off",
            "on" if self.segmentation_offload else "off",
        )
        self.owner.on_link_up(self)

    def _deliver_frames(self, decoder: FrameDecoder) -> None:
        try:
            while not self.closed:
                frame = decoder.maybe_next_frame()
                if frame is None:
                    break
                self.owner.on_frame(self, frame)
        finally:
            if not self.closed:
                self.owner.on_frames_done(self)

    # --- output and control ------------------------------------------------------

    def send_frames(self, frames: list[Frame]) -> None:
        """Write frames to the agent, each with its length prefix (scatter-gather)."""
        if self._writer is not None and not self.closed and frames:
            self._writer.write_frames(frames)

    def close(self, reason: str) -> None:
        """End the session (idempotent), telling the owner once."""
        if self.closed:
            return
        self.closed = True
        self._cancel_handshake_timer()
        if self._writer is not None:
            self._writer.close()
        if self.transport is not None:
            self.transport.abort()
        if self._up:
            logger.info("link from %s: down (%s)", self.peer, reason)
        else:
            self.not_live.warn(
                "link from %s: closed before it became the link (%s)", self.peer, reason
            )
        if self.on_closed is not None:
            self.on_closed(self)
        if self._up:
            self.owner.on_link_down(self, reason)

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None


def _describe_peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if peer in (None, "", b""):
        return "unix peer"
    if isinstance(peer, tuple) and len(peer) == 2:
        return f"cid {peer[0]} port {peer[1]}"
    return str(peer)

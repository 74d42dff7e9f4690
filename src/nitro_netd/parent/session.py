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

A protocol violation (bad handshake, a frame length out of bounds) closes this session
with a logged reason; nothing else is affected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Final, Protocol

from nitro_netd.link import (
    HEADER_WANT_REPLY,
    FrameDecoder,
    HttpHeadReader,
    LinkError,
    LinkProtocol,
    build_connect_reply,
    check_connect_request,
    detect_protocol,
    pack_length,
)

logger = logging.getLogger(__name__)

_HANDSHAKE_CHUNK: Final = 4096
WRITE_HIGH_WATER: Final = 4 << 20
"""Bytes queued towards the agent above which host sockets stop being read."""


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

    def on_link_writable(self, session: LinkSession, writable: bool) -> None:
        """The link's write buffer crossed its high (False) or low (True) water mark."""


class LinkSession(asyncio.BufferedProtocol):
    """The daemon's side of one agent link."""

    def __init__(self, owner: LinkOwner, *, max_frame: int) -> None:
        self.owner = owner
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

    # --- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = _describe_peer(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_HIGH_WATER // 4)
        logger.info("link from %s: connected", self.peer)

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

    def pause_writing(self) -> None:
        self.owner.on_link_writable(self, False)

    def resume_writing(self) -> None:
        self.owner.on_link_writable(self, True)

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
        if head.get(HEADER_WANT_REPLY) is not None and self.transport is not None:
            self.transport.write(build_connect_reply(self.owner.link_plan()))
        self._start_frames(self._head.rest)

    def _start_frames(self, rest: bytes) -> None:
        assert self.protocol is not None
        self._decoder = FrameDecoder(self.protocol, max_frame=self.max_frame)
        self._decoder.receive_data(rest)
        self._up = True
        logger.info("link from %s: up (%s framing)", self.peer, self.protocol.value)
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

    def send_frames(self, frames: list[bytes | bytearray]) -> None:
        """Write frames to the agent in one go, each with its length prefix."""
        if self.transport is None or self.closed or not self._up or not frames:
            return
        assert self.protocol is not None
        header = self.protocol.header_size
        out = bytearray(sum(len(f) for f in frames) + header * len(frames))
        offset = 0
        for frame in frames:
            pack_length(self.protocol, out, offset, len(frame))
            offset += header
            out[offset : offset + len(frame)] = frame
            offset += len(frame)
        self.transport.write(out)

    def write_buffer_size(self) -> int:
        """Bytes queued towards the agent and not yet taken by the kernel."""
        return self.transport.get_write_buffer_size() if self.transport else 0

    def close(self, reason: str) -> None:
        """End the session (idempotent), telling the owner once."""
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        logger.info("link from %s: down (%s)", self.peer, reason)
        if self._up:
            self.owner.on_link_down(self, reason)


def _describe_peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if peer in (None, "", b""):
        return "unix peer"
    if isinstance(peer, tuple) and len(peer) == 2:
        return f"cid {peer[0]} port {peer[1]}"
    return str(peer)

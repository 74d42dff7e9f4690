"""The agent's side of the link handshake, as a pure state machine (sans-IO).

Theory of operation: with the ``qemu`` framing there is no handshake, the link is up at
once. With ``gvproxy`` the agent sends ``POST /connect`` asking for a reply, then listens
for a short while:

* bytes starting ``HTTP/1.`` are our daemon's reply: the head is read whole and checked
  (a refusal is a `LinkError`); whatever follows the head is already frames;
* any other bytes are frames from a peer that does not reply: go at once, keeping them;
* nothing before the wait expires means a stock gvproxy, which never replies and can
  swallow bytes sent right behind the request, hence the pause: go.

A partial ``HTTP/1.`` prefix when the wait expires keeps the handshake waiting for the rest;
the caller bounds that with its own deadline. No real frame can start with ``HTTP/1.``: its
destination MAC would be ``54:50:2f:31:2e:..``, neither ours nor a group address.

Offloads are negotiated here too: an agent that can use them sends
``Nitro-Netd-Offload: csum`` (checksum offload) or ``csum, tso`` (and TCP segmentation
offload), and the session has those that our daemon's reply names (`offloads_agreed`). A
stock gvproxy (no reply) and the qemu framing never do. The reply also states the daemon's
MTU (`stated_mtu`), which the agent gives its TAP for that link.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from nitro_netd.link import (
    HEADER_MTU,
    HEADER_OFFLOAD,
    HEADER_VERSION,
    HEADER_WANT_REPLY,
    MAX_MTU,
    MIN_MTU,
    OFFLOAD_CSUM,
    OFFLOAD_TSO,
    PROTOCOL_VERSION,
    HttpHead,
    HttpHeadReader,
    LinkError,
    LinkProtocol,
    build_connect_request,
    check_connect_reply,
    format_offloads,
    parse_mtu,
    parse_offloads,
)

REPLY_PREFIX: Final = b"HTTP/1."
REQUEST_HEADERS: Final[Mapping[str, str]] = {
    HEADER_VERSION: PROTOCOL_VERSION,
    HEADER_WANT_REPLY: "1",
}
OFFLOAD_REQUEST_HEADERS: Final[Mapping[str, str]] = {
    **REQUEST_HEADERS,
    HEADER_OFFLOAD: OFFLOAD_CSUM,
}
"""The request of an agent that asks for checksum offload."""
TSO_REQUEST_HEADERS: Final[Mapping[str, str]] = {
    **REQUEST_HEADERS,
    HEADER_OFFLOAD: format_offloads((OFFLOAD_CSUM, OFFLOAD_TSO)),
}
"""The request of an agent that asks for checksum and TCP segmentation offload."""


def offloads_agreed(reply: HttpHead | None) -> frozenset[str]:
    """Return the offloads our daemon's reply agrees to for this link.

    The value is read as a comma-separated list, case-insensitively. Segmentation offload
    counts only together with checksum offload.
    """
    agreed = parse_offloads(reply.get(HEADER_OFFLOAD) if reply is not None else None)
    if OFFLOAD_CSUM not in agreed:
        return frozenset()
    return agreed


def stated_mtu(reply: HttpHead | None) -> int | None:
    """Return the link MTU our daemon's reply states (``Nitro-Netd-Mtu``); None if there is
    no reply (a stock gvproxy, the qemu framing) or it states none.

    The agent gives its TAP this MTU for the link: a frame larger than the daemon's MTU
    (without segmentation offload) makes the daemon close the link.

    Raises:
        LinkError: the value is not an MTU the link can carry (`MIN_MTU`..`MAX_MTU`).
    """
    text = reply.get(HEADER_MTU) if reply is not None else None
    if text is None:
        return None
    mtu = parse_mtu(text)
    if mtu is None:
        raise LinkError(
            f"the parent states MTU {text.strip()[:20]!r}, outside {MIN_MTU}..{MAX_MTU}"
        )
    return mtu


class PeerKind(enum.Enum):
    """What answered the agent's connection."""

    NITRO_NETD = "nitro-netd"
    """Our daemon: it answered the request."""
    GVPROXY = "gvproxy"
    """A peer that never answers (a stock gvproxy)."""
    QEMU = "qemu"
    """The qemu framing: no handshake at all."""


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """How the handshake ended: the peer's kind and the first frame bytes, if any."""

    peer: PeerKind
    initial: bytes = b""
    """Stream bytes received after the handshake: the start of the frame stream."""
    reply: HttpHead | None = None
    """Our daemon's reply head (its ``Nitro-Netd-*`` headers carry the network plan)."""
    offload: bool = False
    """Checksum offload is on for this link: the agent asked and the daemon agreed."""
    tso: bool = False
    """TCP segmentation offload is on too (never without `offload`)."""
    reply_overdue: bool = False
    """A reply was asked for and the wait for it ran out: the peer was taken for a stock
    gvproxy, but a slow daemon's reply may still come (`pump.refuse_late_reply`)."""

    def describe(self) -> str:
        """Return the peer's kind for the operator's log."""
        if self.peer is PeerKind.NITRO_NETD and self.reply is not None:
            version = self.reply.get(HEADER_VERSION) or "?"
            return f"nitro-netd (protocol version {version})"
        if self.peer is PeerKind.GVPROXY:
            return "gvproxy-compatible (no reply)"
        return "qemu stream (no handshake)"


class Handshake:
    """Decide from the parent's first bytes what kind of peer it is."""

    def __init__(self, protocol: LinkProtocol, *, offload: bool = False, tso: bool = False) -> None:
        """Args:
        protocol: the link framing.
        offload: ask for checksum offload (the gvproxy framing only; ignored for qemu).
        tso: ask for TCP segmentation offload as well (only with `offload`).
        """
        self.protocol = protocol
        self.offload = offload and protocol is LinkProtocol.GVPROXY
        self.tso = tso and self.offload
        self.result: HandshakeResult | None = None
        """Set once the link is up; at once for the qemu framing."""
        self._prefix = b""
        self._reader: HttpHeadReader | None = None
        if protocol is LinkProtocol.QEMU:
            self.result = HandshakeResult(PeerKind.QEMU)

    def request(self) -> bytes:
        """Return the bytes to send first (nothing for the qemu framing)."""
        if self.protocol is LinkProtocol.QEMU:
            return b""
        if self.tso:
            return build_connect_request(TSO_REQUEST_HEADERS)
        return build_connect_request(OFFLOAD_REQUEST_HEADERS if self.offload else REQUEST_HEADERS)

    def receive_data(self, data: bytes) -> HandshakeResult | None:
        """Add bytes from the parent; return the result once decided.

        Raises:
            LinkError: the reply is malformed or refuses the link.
        """
        if self.result is not None:
            raise RuntimeError("handshake already finished")
        if self._reader is not None:
            return self._receive_reply(data)
        self._prefix += data
        probe = self._prefix[: len(REPLY_PREFIX)]
        if probe == REPLY_PREFIX:
            self._reader = HttpHeadReader()
            prefix, self._prefix = self._prefix, b""
            return self._receive_reply(prefix)
        if not REPLY_PREFIX.startswith(probe):
            self.result = HandshakeResult(PeerKind.GVPROXY, initial=self._prefix)
        return self.result

    def wait_expired(self) -> HandshakeResult | None:
        """The short wait for a reply is over: a silent peer is a stock gvproxy.

        Returns None while part of a reply is buffered: keep reading, within a deadline.
        """
        if self.result is None and not self._prefix and self._reader is None:
            self.result = HandshakeResult(PeerKind.GVPROXY, reply_overdue=True)
        return self.result

    def _receive_reply(self, data: bytes) -> HandshakeResult | None:
        assert self._reader is not None
        head = self._reader.receive_data(data)
        if head is None:
            return None
        check_connect_reply(head)
        agreed = offloads_agreed(head) if self.offload else frozenset()
        self.result = HandshakeResult(
            PeerKind.NITRO_NETD,
            self._reader.rest,
            head,
            offload=OFFLOAD_CSUM in agreed,
            tso=self.tso and OFFLOAD_TSO in agreed,
        )
        return self.result

"""The link protocol between the enclave agent and the parent daemon (sans-IO).

Two framings, both "a length, then one Ethernet II frame without FCS":

* ``gvproxy`` (gvisor-tap-vsock): the agent first sends an HTTP/1.1 ``POST /connect``
  request with an empty body; after its blank line each frame is a 16-bit little-endian
  length followed by the frame. A stock gvproxy never answers the request. Our agent may
  ask for an answer with the ``Nitro-Netd-Reply`` header; only then does our daemon send an
  ``HTTP/1.1 200`` response carrying the network plan in ``Nitro-Netd-*`` headers.
* ``qemu`` (QEMU ``-netdev stream``, passt): no handshake; each frame is a 32-bit
  big-endian length followed by the frame.

Everything here is pure: bytes go in, frames and bytes come out. A length of zero, below
an Ethernet header, or above the configured maximum is a `LinkError`: the caller closes
that link and logs the reason; the daemon lives on.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from nitro_netd import __version__

MIN_FRAME: Final = 14
"""An Ethernet header: nothing shorter is a frame."""
MAX_FRAME_GVPROXY: Final = 0xFFFF
"""The 16-bit length field's limit (MTU + 14 must fit)."""
MAX_FRAME_QEMU: Final = 65550
"""A generous bound for the 32-bit framing (65535-byte IP packet + headers + VLAN)."""
DEFAULT_MTU: Final = 65520
"""The default link MTU; the same value as ``nitro_netd.netstack.config.DEFAULT_MTU``, kept
here so the agent need not import the netstack."""
MIN_MTU: Final = 576
"""The smallest link MTU either side takes: the IPv4 datagram every host must accept; the
same value as ``nitro_netd.netstack.config.MIN_MTU``."""
MAX_MTU: Final = MAX_FRAME_GVPROXY - 14
"""The largest MTU whose frames (MTU + 14) fit the gvproxy framing's 16-bit length."""
MAX_HANDSHAKE: Final = 16384
"""Bytes of HTTP request or response head we accept before giving up."""
PROTOCOL_VERSION: Final = "1"
CONNECT_PATH: Final = "/connect"
HEADER_VERSION: Final = "Nitro-Netd-Version"
HEADER_WANT_REPLY: Final = "Nitro-Netd-Reply"
HEADER_ENCLAVE: Final = "Nitro-Netd-Enclave"
HEADER_MTU: Final = "Nitro-Netd-Mtu"
"""Daemon reply: the link MTU the daemon was given (--mtu); the agent gives its TAP this MTU
for the link."""
HEADER_OFFLOAD: Final = "Nitro-Netd-Offload"
"""A comma-separated list of offloads. Agent: the ones it can do. Daemon reply: the ones
agreed for this link (a subset). See `OFFLOAD_CSUM` and `OFFLOAD_TSO`."""
OFFLOAD_CSUM: Final = "csum"
"""The agent marks enclave-bound TCP frames CHECKSUM_PARTIAL and lets the TAP hand it frames
with partial checksums: TCP checksums are neither computed nor checked by the daemon."""
OFFLOAD_TSO: Final = "tso"
"""TCP segmentation offload, only together with `OFFLOAD_CSUM`: TCP/IPv4 frames may be
larger than the MTU, up to the framing's limit, in both directions. The agent lets the TAP
hand it such super-segments and has the enclave's kernel take the daemon's as GSO packets,
whose segments are at most the MTU."""


_LE16: Final = struct.Struct("<H")
_BE32: Final = struct.Struct(">I")


class LinkProtocol(enum.Enum):
    """How frames are delimited on the link stream."""

    GVPROXY = "gvproxy"
    QEMU = "qemu"

    @property
    def length_prefix(self) -> struct.Struct:
        """The format of the length before each frame: 16-bit little-endian (gvproxy) or
        32-bit big-endian (qemu)."""
        return _LE16 if self is LinkProtocol.GVPROXY else _BE32

    @property
    def header_size(self) -> int:
        """Bytes of length prefix before each frame."""
        return self.length_prefix.size

    @property
    def max_frame(self) -> int:
        """The largest frame the framing can carry."""
        return MAX_FRAME_GVPROXY if self is LinkProtocol.GVPROXY else MAX_FRAME_QEMU


class LinkError(Exception):
    """The peer broke the link protocol; the link must be closed."""


def parse_mtu(text: str) -> int | None:
    """Return the MTU `text` gives (ASCII digits, `MIN_MTU`..`MAX_MTU`), or None."""
    value = text.strip()
    if len(value) > 5 or not (value.isascii() and value.isdigit()):
        return None  # (int() of thousands of digits would raise: the text is the peer's)
    mtu = int(value)
    return mtu if MIN_MTU <= mtu <= MAX_MTU else None


def pack_length(
    protocol: LinkProtocol, buffer: bytearray | memoryview, offset: int, length: int
) -> None:
    """Write a frame's length prefix into `buffer` at `offset`."""
    protocol.length_prefix.pack_into(buffer, offset, length)


def encode_frame(protocol: LinkProtocol, frame: bytes | bytearray | memoryview) -> bytes:
    """Return `frame` with its length prefix.

    Raises:
        ValueError: the frame does not fit the framing.
    """
    n = len(frame)
    if not MIN_FRAME <= n <= protocol.max_frame:
        raise ValueError(f"frame of {n} bytes outside {MIN_FRAME}..{protocol.max_frame}")
    return protocol.length_prefix.pack(n) + bytes(frame)


class FrameDecoder:
    """Split a link byte stream into frames, in place, without per-frame allocation.

    Feed it with `receive_data(bytes)`, or zero-copy with `get_buffer()` (fill the returned
    view, e.g. with ``recv_into``) and `buffer_updated(n)`. Then call `maybe_next_frame()`
    until it returns None. A returned frame is a view into the decoder's buffer: it stays
    valid only until the next `get_buffer()` or `receive_data()` call, so copy what you keep.
    """

    def __init__(
        self, protocol: LinkProtocol, *, max_frame: int | None = None, capacity: int = 1 << 20
    ) -> None:
        self.protocol = protocol
        self.max_frame = min(max_frame or protocol.max_frame, protocol.max_frame)
        self._length = protocol.length_prefix
        self._header = self._length.size
        size = max(capacity, 2 * (self.max_frame + self._header))
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._end - self._start

    def get_buffer(self) -> memoryview:
        """Return free space to receive into (compacting first if needed)."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buffer) - self._end < self.max_frame + self._header:
            pending = self._end - self._start
            self._view[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Record that `nbytes` were written into the view from `get_buffer()`."""
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the stream (any amount: the buffer grows if they do not fit)."""
        view = memoryview(data)
        free = self.get_buffer()
        if len(free) < len(view):
            self._grow(self.pending + len(view))
            free = self._view[self._end :]
        free[: len(view)] = view
        self.buffer_updated(len(view))

    def _grow(self, needed: int) -> None:
        """Move the pending bytes into a new buffer with room for `needed` bytes and a frame."""
        size = max(2 * len(self._buffer), needed + self.max_frame + self._header)
        buffer = bytearray(size)
        pending = self.pending
        buffer[:pending] = self._view[self._start : self._end]
        self._buffer, self._view = buffer, memoryview(buffer)
        self._start, self._end = 0, pending

    def maybe_next_frame(self) -> memoryview | None:
        """Return the next whole frame, or None if more bytes are needed.

        Raises:
            LinkError: the next length is out of bounds; the stream cannot be resynchronised.
        """
        start = self._start
        if self._end - start < self._header:
            return None
        (length,) = self._length.unpack_from(self._buffer, start)
        if not MIN_FRAME <= length <= self.max_frame:
            raise LinkError(f"invalid frame length {length}: outside {MIN_FRAME}..{self.max_frame}")
        begin = start + self._header
        if self._end - begin < length:
            return None
        self._start = begin + length
        return self._view[begin : self._start]

    def take_pending(self) -> bytes:
        """Remove and return the bytes not yet decoded (for handing a stream over)."""
        data = bytes(self._view[self._start : self._end])
        self._start = self._end = 0
        return data


# --- the HTTP handshake --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpHead:
    """A parsed HTTP/1.1 request or response head. Header names are lower-cased."""

    start_line: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        """Return a header's value by case-insensitive name."""
        return self.headers.get(name.lower())


def build_connect_request(headers: Mapping[str, str] | None = None) -> bytes:
    """Return the agent's ``POST /connect`` request, with optional extension headers."""
    lines = [
        f"POST {CONNECT_PATH} HTTP/1.1",
        "Host: nitro-netd",
        f"User-Agent: nitro-netd/{__version__}",
        "Content-Length: 0",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def build_connect_reply(headers: Mapping[str, str] | None = None) -> bytes:
    """Return our daemon's answer to a request that asked for one."""
    lines = ["HTTP/1.1 200 OK", f"{HEADER_VERSION}: {PROTOCOL_VERSION}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class HttpHeadReader:
    """Accumulate bytes until a whole HTTP head; keep what follows it (the first frames)."""

    def __init__(self) -> None:
        self._data = bytearray()
        self.rest = b""
        """Bytes that arrived after the head's blank line."""

    def receive_data(self, data: bytes | bytearray | memoryview) -> HttpHead | None:
        """Add bytes; return the head once complete.

        Raises:
            LinkError: the head is too long or not HTTP/1.x.
        """
        self._data += data
        # Look for the blank line only where a head of at most MAX_HANDSHAKE bytes can end.
        end = self._data.find(b"\r\n\r\n", 0, MAX_HANDSHAKE + 4)
        if end < 0:
            if len(self._data) >= MAX_HANDSHAKE + 4:
                raise LinkError(f"HTTP head longer than {MAX_HANDSHAKE} bytes")
            return None
        self.rest = bytes(self._data[end + 4 :])
        return _parse_head(bytes(self._data[:end]))


def _parse_head(raw: bytes) -> HttpHead:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise LinkError("HTTP head is not ASCII") from exc
    start, *header_lines = text.split("\r\n")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise LinkError(f"malformed HTTP header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return HttpHead(start, headers)


def check_connect_request(head: HttpHead) -> None:
    """Accept ``POST /connect HTTP/1.x`` with an empty body, as gvproxy does.

    Raises:
        LinkError: any other request.
    """
    parts = head.start_line.split(" ")
    if (
        len(parts) != 3
        or parts[0] != "POST"
        or parts[1] != CONNECT_PATH
        or not parts[2].startswith("HTTP/1.")
    ):
        raise LinkError(f"expected 'POST /connect HTTP/1.1', got {head.start_line[:80]!r}")
    if head.get("transfer-encoding") is not None or (head.get("content-length") or "0") != "0":
        raise LinkError("the /connect request must have an empty body")


def check_connect_reply(head: HttpHead) -> None:
    """Accept an ``HTTP/1.x 200`` answer.

    Raises:
        LinkError: any other status.
    """
    parts = head.start_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
        raise LinkError(f"parent refused the link: {head.start_line[:80]!r}")


def detect_protocol(first_bytes: bytes) -> LinkProtocol | None:
    """Tell the framing from a stream's first bytes; None if more are needed.

    A gvproxy-style agent starts with ``POST``; a QEMU-style one with a 32-bit big-endian
    length, whose first two bytes are zero for any frame up to 64 KiB.
    Anything else is refused (`LinkError`) before it can replace a working link: an HTTP
    probe, a port scanner, a peer speaking another protocol.
    """
    probe = first_bytes[:4]
    if b"POST".startswith(probe):
        return LinkProtocol.GVPROXY if len(probe) == 4 else None
    if not any(probe[:2]):  # may be a 32-bit big-endian length below 64 KiB
        if len(probe) < 4:
            return None
        if MIN_FRAME <= int.from_bytes(probe) <= LinkProtocol.QEMU.max_frame:
            return LinkProtocol.QEMU
    raise LinkError(
        f"not an enclave link: it starts with {bytes(probe)!r}, neither POST (gvproxy"
        " framing) nor a frame length (qemu framing)"
    )


def parse_offloads(value: str | None) -> frozenset[str]:
    """Return the offloads a ``Nitro-Netd-Offload`` value names (lower case, no blanks)."""
    if not value:
        return frozenset()
    return frozenset(token for token in (t.strip().lower() for t in value.split(",")) if token)


def format_offloads(offloads: Iterable[str]) -> str:
    """Return a ``Nitro-Netd-Offload`` value for `offloads`, in a stable order."""
    return ", ".join(sorted(offloads))

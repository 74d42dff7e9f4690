"""UDP datagrams over IPv4 (RFC 768), checksummed with the IPv4 pseudo-header."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.checksum import internet_checksum
from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.ipv4 import IpProto, pseudo_header_sum

UDP_HEADER_LEN: Final = 8
MAX_UDP_LEN: Final = 0xFFFF
"""The 16-bit length field's limit, header included."""
_HEADER: Final = struct.Struct("!HHHH")


@dataclass(frozen=True, slots=True)
class UdpHeader:
    """The 8-byte UDP header (RFC 768). `length` counts the header and the payload."""

    source_port: int
    destination_port: int
    length: int
    checksum: int
    """As on the wire; 0 means the sender computed none (allowed over IPv4)."""


# RFC 768 "Format" and "Fields"; RFC 1122 §4.1.3.4 for the length and checksum checks.
def parse_udp(
    data: bytes | bytearray | memoryview,
    *,
    source: IPv4Address,
    destination: IPv4Address,
    verify_checksum: bool = True,
) -> tuple[UdpHeader, memoryview]:
    """Decode a UDP datagram carried in an IPv4 packet from `source` to `destination`.

    `data` is the IPv4 payload. Bytes past the UDP length field are ignored, as Linux does.
    A checksum of zero means "none" and is accepted; any other must verify.

    Args:
        data: the IPv4 payload.
        source: the IPv4 source address (for the pseudo-header).
        destination: the IPv4 destination address.
        verify_checksum: False when the link vouches for the checksum (offload).

    Returns:
        The header and a view of the payload.

    Raises:
        FrameError: truncated, a length field below 8, or a bad checksum. Raising anything
            else is a bug.
    """
    if len(data) < UDP_HEADER_LEN:
        raise FrameError(DropReason.TRUNCATED, f"UDP of {len(data)} bytes")
    sport, dport, length, checksum = _HEADER.unpack_from(data)
    if length < UDP_HEADER_LEN:
        raise FrameError(DropReason.BAD_HEADER, f"UDP length field {length}")
    if length > len(data):
        raise FrameError(DropReason.TRUNCATED, f"UDP length field {length} of {len(data)} bytes")
    view = memoryview(data)[:length]
    if checksum != 0 and verify_checksum:
        initial = pseudo_header_sum(source, destination, IpProto.UDP, length)
        if internet_checksum(view, initial) != 0:
            raise FrameError(DropReason.BAD_CHECKSUM, "UDP checksum")
    return UdpHeader(sport, dport, length, checksum), view[UDP_HEADER_LEN:]


def build_udp(
    source: IPv4Address,
    destination: IPv4Address,
    source_port: int,
    destination_port: int,
    payload: bytes | bytearray | memoryview,
) -> bytes:
    """Return a UDP datagram with its checksum over the IPv4 pseudo-header.

    A computed checksum of zero is sent as 0xFFFF, since zero means "none" (RFC 768).

    Raises:
        ValueError: the datagram would exceed 65535 bytes.
    """
    length = UDP_HEADER_LEN + len(payload)
    if length > MAX_UDP_LEN:
        raise ValueError(f"UDP length {length} exceeds {MAX_UDP_LEN}")
    raw = bytearray(_HEADER.pack(source_port, destination_port, length, 0))
    raw += payload
    checksum = internet_checksum(raw, pseudo_header_sum(source, destination, IpProto.UDP, length))
    struct.pack_into("!H", raw, 6, checksum or 0xFFFF)
    return bytes(raw)

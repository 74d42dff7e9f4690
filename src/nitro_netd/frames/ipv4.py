"""IPv4 headers (RFC 791). Options are carried but not interpreted; fragments are refused."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.checksum import internet_checksum, ones_complement_sum
from nitro_netd.frames.errors import DropReason, FrameError

IPV4_HEADER_LEN: Final = 20
_HEADER: Final = struct.Struct("!BBHHHBBH4s4s")
_FLAG_MF: Final = 0x2000
_OFFSET_MASK: Final = 0x1FFF
_FLAG_DF: Final = 0x4000
DEFAULT_TTL: Final = 64


class IpProto(enum.IntEnum):
    """IP protocol numbers (IANA) the stack knows by name."""

    ICMP = 1
    TCP = 6
    UDP = 17
    ICMPV6 = 58


@dataclass(frozen=True, slots=True)
class IPv4Header:
    """The fields of an IPv4 header that the stack uses."""

    source: IPv4Address
    destination: IPv4Address
    protocol: int
    ttl: int
    total_length: int
    header_length: int
    identification: int = 0
    dont_fragment: bool = False
    tos: int = 0


def parse_ipv4(data: bytes | bytearray | memoryview) -> tuple[IPv4Header, memoryview]:
    """Decode an IPv4 header, verify its checksum, and return the payload it bounds.

    Trailing bytes past `total_length` (Ethernet padding) are cut off.

    Raises:
        FrameError: truncated, bad version/IHL/length, bad checksum, or a fragment.
    """
    if len(data) < IPV4_HEADER_LEN:
        raise FrameError(DropReason.TRUNCATED, f"IPv4 packet of {len(data)} bytes")
    ver_ihl, tos, total, ident, flags_frag, ttl, proto, _csum, src, dst = _HEADER.unpack_from(data)
    version, ihl = ver_ihl >> 4, (ver_ihl & 0xF) * 4
    if version != 4 or ihl < IPV4_HEADER_LEN:
        raise FrameError(DropReason.BAD_HEADER, f"IPv4 version={version} ihl={ihl}")
    if total < ihl or total > len(data):
        raise FrameError(DropReason.TRUNCATED, f"IPv4 total_length={total} of {len(data)} bytes")
    view = memoryview(data)
    if internet_checksum(view[:ihl]) != 0:
        raise FrameError(DropReason.BAD_CHECKSUM, "IPv4 header checksum")
    if flags_frag & (_FLAG_MF | _OFFSET_MASK):
        raise FrameError(DropReason.FRAGMENT, f"IPv4 fragment flags_offset={flags_frag:#x}")
    header = IPv4Header(
        IPv4Address(src),
        IPv4Address(dst),
        proto,
        ttl,
        total,
        ihl,
        ident,
        bool(flags_frag & _FLAG_DF),
        tos,
    )
    return header, view[ihl:total]


def build_ipv4_header(
    source: IPv4Address,
    destination: IPv4Address,
    protocol: int,
    payload_length: int,
    *,
    ttl: int = DEFAULT_TTL,
    identification: int = 0,
    dont_fragment: bool = True,
) -> bytes:
    """Return a 20-byte IPv4 header (no options) with its checksum filled in."""
    total = IPV4_HEADER_LEN + payload_length
    if total > 0xFFFF:
        raise ValueError(f"IPv4 total length {total} exceeds 65535")
    flags = _FLAG_DF if dont_fragment else 0
    args = (
        0x45,
        0,
        total,
        identification,
        flags,
        ttl,
        protocol,
        0,
        source.packed,
        destination.packed,
    )
    header = bytearray(_HEADER.pack(*args))
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return bytes(header)


def pseudo_header_sum(
    source: IPv4Address, destination: IPv4Address, protocol: int, length: int
) -> int:
    """Return the partial sum of the IPv4 pseudo-header for TCP/UDP checksums (RFC 9293 §3.1)."""
    return ones_complement_sum(
        source.packed + destination.packed + struct.pack("!xBH", protocol, length)
    )

"""ICMP for IPv4 (RFC 792): echo, and destination unreachable."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from nitro_netd.frames.checksum import internet_checksum
from nitro_netd.frames.errors import DropReason, FrameError

ICMP_HEADER_LEN: Final = 8
_HEADER: Final = struct.Struct("!BBHHH")


class IcmpType(enum.IntEnum):
    """ICMPv4 message types (RFC 792) the stack knows by name."""

    ECHO_REPLY = 0
    DEST_UNREACHABLE = 3
    ECHO_REQUEST = 8
    TIME_EXCEEDED = 11


class UnreachableCode(enum.IntEnum):
    """Codes of ICMP destination unreachable (RFC 792, RFC 1122 §3.2.2.1)."""

    NET = 0
    HOST = 1
    PROTOCOL = 2
    PORT = 3
    FRAGMENTATION_NEEDED = 4
    ADMIN_PROHIBITED = 13


@dataclass(frozen=True, slots=True)
class IcmpMessage:
    """An ICMP message. `identifier` and `sequence` are the second 32-bit word's halves
    (echo identifier and sequence; for errors, the unused field or next-hop MTU)."""

    type: int
    code: int
    identifier: int
    sequence: int
    payload: bytes


def parse_icmp(data: bytes | bytearray | memoryview) -> IcmpMessage:
    """Decode and verify an ICMP message.

    Raises:
        FrameError: truncated, or a bad checksum.
    """
    if len(data) < ICMP_HEADER_LEN:
        raise FrameError(DropReason.TRUNCATED, f"ICMP of {len(data)} bytes")
    if internet_checksum(data) != 0:
        raise FrameError(DropReason.BAD_CHECKSUM, "ICMP checksum")
    icmp_type, code, _csum, ident, seq = _HEADER.unpack_from(data)
    return IcmpMessage(icmp_type, code, ident, seq, bytes(data[ICMP_HEADER_LEN:]))


def build_icmp(message: IcmpMessage) -> bytes:
    """Encode an ICMP message with its checksum."""
    raw = bytearray(
        _HEADER.pack(message.type, message.code, 0, message.identifier, message.sequence)
    )
    raw += message.payload
    struct.pack_into("!H", raw, 2, internet_checksum(raw))
    return bytes(raw)

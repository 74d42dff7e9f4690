"""ARP for IPv4 over Ethernet (RFC 826)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.ethernet import EtherType, MacAddress

ARP_LEN: Final = 28
_ARP: Final = struct.Struct("!HHBBH6s4s6s4s")
_HTYPE_ETHERNET: Final = 1


class ArpOp(enum.IntEnum):
    """ARP operation codes (RFC 826)."""

    REQUEST = 1
    REPLY = 2


@dataclass(frozen=True, slots=True)
class ArpPacket:
    """An Ethernet/IPv4 ARP packet."""

    op: int
    sender_mac: MacAddress
    sender_ip: IPv4Address
    target_mac: MacAddress
    target_ip: IPv4Address


def parse_arp(data: bytes | bytearray | memoryview) -> ArpPacket:
    """Decode an Ethernet/IPv4 ARP packet.

    Raises:
        FrameError: too short, or not Ethernet/IPv4 ARP.
    """
    if len(data) < ARP_LEN:
        raise FrameError(DropReason.TRUNCATED, f"ARP of {len(data)} bytes")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data)
    if (htype, ptype, hlen, plen) != (_HTYPE_ETHERNET, EtherType.IPV4, 6, 4):
        raise FrameError(DropReason.UNSUPPORTED_ARP, f"ARP htype={htype} ptype={ptype:#x}")
    return ArpPacket(op, MacAddress(sha), IPv4Address(spa), MacAddress(tha), IPv4Address(tpa))


def build_arp(packet: ArpPacket) -> bytes:
    """Encode an Ethernet/IPv4 ARP packet."""
    return _ARP.pack(
        _HTYPE_ETHERNET,
        EtherType.IPV4,
        6,
        4,
        packet.op,
        packet.sender_mac.octets,
        packet.sender_ip.packed,
        packet.target_mac.octets,
        packet.target_ip.packed,
    )

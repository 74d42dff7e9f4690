"""Ethernet II frames (IEEE 802.3 with an EtherType, no FCS on the link)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from nitro_netd.frames.errors import DropReason, FrameError

ETHERNET_HEADER_LEN: Final = 14
_HEADER: Final = struct.Struct("!6s6sH")
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")


class EtherType(enum.IntEnum):
    """EtherType values (IEEE 802 numbers) that the stack knows by name."""

    IPV4 = 0x0800
    ARP = 0x0806
    VLAN = 0x8100
    IPV6 = 0x86DD


@dataclass(frozen=True, slots=True)
class MacAddress:
    """A 48-bit IEEE 802 MAC address."""

    octets: bytes

    def __post_init__(self) -> None:
        if len(self.octets) != 6:
            raise ValueError(f"a MAC address has 6 octets, not {len(self.octets)}")

    @classmethod
    def parse(cls, text: str) -> MacAddress:
        """Parse `aa:bb:cc:dd:ee:ff` (or with dashes); raise ValueError otherwise."""
        parts = text.replace("-", ":").split(":")
        if len(parts) != 6 or not all(len(p) == 2 and _HEX_DIGITS.issuperset(p) for p in parts):
            raise ValueError(f"not a MAC address: {text!r}")
        return cls(bytes(int(p, 16) for p in parts))

    @property
    def is_multicast(self) -> bool:
        """True for group addresses, broadcast included (I/G bit set)."""
        return bool(self.octets[0] & 1)

    def __str__(self) -> str:
        return ":".join(f"{b:02x}" for b in self.octets)


BROADCAST_MAC: Final = MacAddress(b"\xff" * 6)


@dataclass(frozen=True, slots=True)
class EthernetHeader:
    """The 14-byte Ethernet II header."""

    destination: MacAddress
    source: MacAddress
    ethertype: int


def parse_ethernet(frame: bytes | bytearray | memoryview) -> tuple[EthernetHeader, memoryview]:
    """Split a frame into its header and payload.

    Raises:
        FrameError: the frame is shorter than an Ethernet header.
    """
    if len(frame) < ETHERNET_HEADER_LEN:
        raise FrameError(DropReason.TRUNCATED, f"ethernet frame of {len(frame)} bytes")
    dst, src, ethertype = _HEADER.unpack_from(frame)
    header = EthernetHeader(MacAddress(dst), MacAddress(src), ethertype)
    return header, memoryview(frame)[ETHERNET_HEADER_LEN:]


def build_ethernet(
    destination: MacAddress, source: MacAddress, ethertype: int, payload: bytes | memoryview
) -> bytes:
    """Return a whole Ethernet II frame."""
    return _HEADER.pack(destination.octets, source.octets, ethertype) + bytes(payload)

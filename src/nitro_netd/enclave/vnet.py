"""The 10-byte ``struct virtio_net_hdr`` in front of every frame on an ``IFF_VNET_HDR`` TAP.

Layout (little-endian, as a TAP uses on every host the agent runs on)::

    flags u8, gso_type u8, hdr_len le16, gso_size le16, csum_start le16, csum_offset le16

Frames the agent writes into the TAP get `ZERO_HEADER` (a complete frame, checksums
included), except, with checksum offload on, IPv4 TCP segments: their header says
``NEEDS_CSUM`` with the TCP checksum's place (`header_for`), and the parent has left only
the pseudo-header sum there. The enclave's kernel takes such a segment as CHECKSUM_PARTIAL,
which counts as verified on local delivery. The headers are precomputed, one per possible
first byte of the IPv4 header, so choosing one costs a few byte comparisons and one lookup.
With segmentation offload, a TCP segment carrying more than one MTU-sized segment's worth
gets a ``GSO_TCPV4`` header instead (`gso_header`), built per frame.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from nitro_netd.enclave.tap import VNET_HDR_SIZE

VNET_HDR: Final = struct.Struct("<BBHHHH")
F_NEEDS_CSUM: Final = 0x01
"""``VIRTIO_NET_HDR_F_NEEDS_CSUM``: checksum from csum_start, stored at csum_offset after it."""
F_DATA_VALID: Final = 0x02
"""``VIRTIO_NET_HDR_F_DATA_VALID``: set by the kernel on some frames it hands over; ignored."""
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
"""``VIRTIO_NET_HDR_GSO_TCPV4``: a TCP/IPv4 super-segment, cut into `gso_size` pieces."""
GSO_ECN: Final = 0x80
"""``VIRTIO_NET_HDR_GSO_ECN``: may be or-ed into a GSO type."""
GSO_ACCEPTED_MASK: Final = 0xFF ^ (GSO_TCPV4 | GSO_ECN)
"""A TAP frame's gso_type with any of these bits set is not a TCP/IPv4 one."""
ZERO_HEADER: Final = bytes(VNET_HDR_SIZE)
"""A plain frame: no offload asked, no GSO."""
ETHERNET_HEADER: Final = 14
TCP_CSUM_OFFSET: Final = 16
"""Where a TCP header keeps its checksum."""
MIN_TCP_FRAME: Final = ETHERNET_HEADER + 20 + 20
"""The shortest frame that can hold an Ethernet, an IPv4 and a TCP header."""
_ETHERTYPE_IPV4_HI: Final = 0x08
_ETHERTYPE_IPV4_LO: Final = 0x00
_PROTO_TCP: Final = 6

assert VNET_HDR.size == VNET_HDR_SIZE


class VnetHeader(NamedTuple):
    """A decoded ``struct virtio_net_hdr``."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        """Return the 10 bytes of this header."""
        return VNET_HDR.pack(*self)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VnetHeader:
        """Decode the first 10 bytes of `data`.

        Raises:
            struct.error: fewer than 10 bytes.
        """
        return cls(*VNET_HDR.unpack_from(data))


def csum_header(csum_start: int) -> bytes:
    """Return a ``NEEDS_CSUM`` header for a TCP segment whose TCP header starts there."""
    return VnetHeader(F_NEEDS_CSUM, csum_start=csum_start, csum_offset=TCP_CSUM_OFFSET).pack()


def _build_csum_headers() -> tuple[bytes, ...]:
    """One header per value of the IPv4 header's first byte (version and IHL).

    Only version 4 with an IHL of 5..15 words gets a ``NEEDS_CSUM`` header; anything else is
    not a valid IPv4 header and goes with `ZERO_HEADER` (the enclave's kernel drops it).
    """
    headers = [ZERO_HEADER] * 256
    for ihl in range(5, 16):
        headers[0x40 | ihl] = csum_header(ETHERNET_HEADER + ihl * 4)
    return tuple(headers)


CSUM_HEADERS: Final = _build_csum_headers()
"""Indexed by the byte after the Ethernet header (IPv4 version and IHL)."""


def gso_header(frame: bytes | bytearray | memoryview, gso_size: int) -> bytes:
    """Return a ``NEEDS_CSUM`` + ``GSO_TCPV4`` header for a TCP/IPv4 super-segment.

    The enclave's kernel takes the frame as one packet of `gso_size`-byte segments (as if
    its own GRO had merged them). `frame` must pass `is_tcp_ipv4`; ``hdr_len`` (all headers)
    is read from its IHL and TCP data offset. A frame whose IPv4 header is not valid, or too
    short to hold the TCP header it claims, gets the same header as without GSO (`ZERO_HEADER`
    or a plain ``NEEDS_CSUM`` one), never a wrong GSO header.
    """
    plain = CSUM_HEADERS[frame[ETHERNET_HEADER]]
    if plain is ZERO_HEADER:
        return plain
    csum_start = ETHERNET_HEADER + (frame[ETHERNET_HEADER] & 0x0F) * 4
    if len(frame) < csum_start + 20:
        return plain
    hdr_len = csum_start + (frame[csum_start + 12] >> 4) * 4
    if not csum_start + 20 <= hdr_len < len(frame):
        return plain
    return VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, csum_start, TCP_CSUM_OFFSET)


def is_tcp_ipv4(frame: bytes | bytearray | memoryview) -> bool:
    """Return True for an unfragmented IPv4 frame carrying TCP (the frames to mark).

    EtherType 0x0800 (no VLAN tag), protocol 6, and neither more-fragments nor an offset.
    """
    return (
        len(frame) >= MIN_TCP_FRAME
        and frame[23] == _PROTO_TCP
        and frame[12] == _ETHERTYPE_IPV4_HI
        and frame[13] == _ETHERTYPE_IPV4_LO
        and not (frame[20] & 0x3F or frame[21])
    )


def header_for(frame: bytes | bytearray | memoryview, gso_size: int = 0) -> bytes:
    """Return the header to write in front of an enclave-bound frame, offload on.

    With `gso_size` (segmentation offload on), a TCP frame carrying more than one segment of
    that size gets a GSO header. The pump inlines the same tests; this is their reference.
    """
    if is_tcp_ipv4(frame):
        if gso_size and len(frame) > gso_size + MIN_TCP_FRAME:
            return gso_header(frame, gso_size)
        return CSUM_HEADERS[frame[14]]
    return ZERO_HEADER

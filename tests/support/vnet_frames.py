"""Frames and virtio-net headers for the agent's offload tests, built by hand.

Independent of `nitro_netd.enclave.vnet` on purpose: the expected header of a frame is
derived here from the frame's fields with `struct`, so the pump's inlined classifier and
the precomputed headers are checked against a second implementation.
"""

from __future__ import annotations

import random
import struct

VNET_HDR_LEN = 10
NEEDS_CSUM = 1
VNET_GSO_TCPV4 = 1
VNET_GSO_UDP = 3
VNET_GSO_TCPV6 = 4
VNET_GSO_ECN = 0x80
PLAIN_HEADER = bytes(VNET_HDR_LEN)
MAC_ENCLAVE = bytes.fromhex("5255c0a87f02")
MAC_GATEWAY = bytes.fromhex("5255c0a87f01")
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17


def vnet_header(
    flags: int = 0,
    gso_type: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    """Return a ``struct virtio_net_hdr`` (little-endian)."""
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def ipv4_frame(
    proto: int = PROTO_TCP,
    *,
    payload: bytes = b"x" * 40,
    options: bytes = b"",
    flags_fragment: int = 0x4000,
    ethertype: int = ETHERTYPE_IPV4,
    version: int = 4,
    tcp_options: bytes = b"",
) -> bytes:
    """Return an Ethernet frame with an IPv4 header and an L4 header stand-in.

    The stand-in is 20 zero bytes and `tcp_options`, except for a TCP header's data offset
    (byte 12), which gives its length. `flags_fragment` is the IPv4 flags + fragment offset
    field (default: DF only); checksums are left zero, the agent never looks at them.
    """
    assert len(options) % 4 == 0
    assert len(tcp_options) % 4 == 0
    ihl = 5 + len(options) // 4
    data_offset = 5 + len(tcp_options) // 4
    l4 = bytes(12) + bytes([data_offset << 4]) + bytes(7) + tcp_options + payload
    total = ihl * 4 + len(l4)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        (version << 4) | ihl,
        0,
        total,
        0x1234,
        flags_fragment,
        64,
        proto,
        0,
        bytes([192, 168, 127, 1]),
        bytes([192, 168, 127, 2]),
    )
    return MAC_ENCLAVE + MAC_GATEWAY + struct.pack("!H", ethertype) + ip + options + l4


def expected_header(frame: bytes, offload: bool, gso_size: int = 0) -> bytes:
    """The header the agent must write before an enclave-bound `frame`.

    With `gso_size` (segmentation offload on), a TCP/IPv4 frame longer than one segment of
    that size behind the shortest headers gets a GSO header."""
    if not offload or len(frame) < 54:
        return PLAIN_HEADER
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    version_ihl, _, _, _, flags_fragment, _, proto = struct.unpack_from("!BBHHHBB", frame, 14)
    version, ihl = version_ihl >> 4, version_ihl & 0x0F
    if ethertype != ETHERTYPE_IPV4 or proto != PROTO_TCP or version != 4 or ihl < 5:
        return PLAIN_HEADER
    if flags_fragment & 0x3FFF:
        return PLAIN_HEADER
    csum_start = 14 + ihl * 4
    if gso_size and len(frame) > gso_size + 54:
        hdr_len = csum_start + (frame[csum_start + 12] >> 4) * 4
        return vnet_header(NEEDS_CSUM, VNET_GSO_TCPV4, hdr_len, gso_size, csum_start, 16)
    return vnet_header(NEEDS_CSUM, csum_start=csum_start, csum_offset=16)


def mixed_frames(seed: int, count: int) -> list[bytes]:
    """IPv4 TCP (with and without options, fragments, longer than an MTU of 1500), UDP,
    ICMP, ARP, IPv6, VLAN, runts."""
    rng = random.Random(seed)
    makers = [
        lambda: ipv4_frame(PROTO_TCP, payload=rng.randbytes(rng.randint(0, 1400))),
        lambda: ipv4_frame(PROTO_TCP, payload=rng.randbytes(rng.randint(9000, 60000))),
        lambda: ipv4_frame(PROTO_TCP, options=rng.randbytes(4 * rng.randint(1, 10))),
        lambda: ipv4_frame(PROTO_TCP, flags_fragment=0x2000),  # MF
        lambda: ipv4_frame(PROTO_TCP, flags_fragment=rng.randint(1, 0x1FFF)),  # an offset
        lambda: ipv4_frame(PROTO_TCP, flags_fragment=0),  # no DF: still marked
        lambda: ipv4_frame(PROTO_UDP, payload=rng.randbytes(rng.randint(0, 1400))),
        lambda: ipv4_frame(PROTO_ICMP),
        lambda: ipv4_frame(PROTO_TCP, ethertype=ETHERTYPE_ARP),
        lambda: ipv4_frame(PROTO_TCP, ethertype=ETHERTYPE_VLAN),
        lambda: ipv4_frame(PROTO_TCP, version=6),
        lambda: ipv4_frame(PROTO_TCP, payload=b"")[: rng.randint(14, 53)],  # too short for TCP
        lambda: rng.randbytes(rng.randint(14, 3000)),
        lambda: ipv4_frame(  # around a GSO size of 1460, with IP and TCP options
            PROTO_TCP,
            payload=rng.randbytes(rng.randint(1380, 3000)),
            options=rng.randbytes(4 * rng.randint(0, 10)),
            tcp_options=rng.randbytes(4 * rng.randint(0, 10)),
        ),
    ]
    return [rng.choice(makers)() for _ in range(count)]

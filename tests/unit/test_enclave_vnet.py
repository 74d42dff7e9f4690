"""The virtio-net headers the agent writes before enclave-bound frames, and the classifier
that picks them (no TAP needed)."""

from __future__ import annotations

import struct

import pytest

from nitro_netd.enclave.tap import VNET_HDR_SIZE
from nitro_netd.enclave.vnet import (
    CSUM_HEADERS,
    F_NEEDS_CSUM,
    ZERO_HEADER,
    VnetHeader,
    csum_header,
    header_for,
    is_tcp_ipv4,
)
from tests.support.vnet_frames import (
    ETHERTYPE_ARP,
    ETHERTYPE_IPV6,
    ETHERTYPE_VLAN,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    expected_header,
    ipv4_frame,
    mixed_frames,
)


def test_vnet_zero_header_is_ten_zero_bytes() -> None:
    assert VNET_HDR_SIZE == 10
    assert bytes(10) == ZERO_HEADER
    assert VnetHeader().pack() == ZERO_HEADER


def test_vnet_csum_header_bytes_for_a_plain_ipv4_tcp_segment() -> None:
    # flags=NEEDS_CSUM, gso_type=0, hdr_len=0, gso_size=0, csum_start=34, csum_offset=16
    assert csum_header(34) == bytes.fromhex("01 00 0000 0000 2200 1000")
    assert VnetHeader.unpack(csum_header(34)) == VnetHeader(
        flags=F_NEEDS_CSUM, csum_start=34, csum_offset=16
    )


def test_vnet_header_round_trip() -> None:
    header = VnetHeader(flags=3, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34,
                        csum_offset=16)  # fmt: skip
    assert len(header.pack()) == 10
    assert VnetHeader.unpack(header.pack()) == header
    assert header.pack() == struct.pack("<BBHHHH", 3, 1, 54, 1448, 34, 16)


def test_vnet_precomputed_headers_follow_the_ihl() -> None:
    assert len(CSUM_HEADERS) == 256
    for ihl in range(5, 16):
        assert VnetHeader.unpack(CSUM_HEADERS[0x40 | ihl]).csum_start == 14 + 4 * ihl
    assert CSUM_HEADERS[0x45] == csum_header(34)
    marked = {index for index, header in enumerate(CSUM_HEADERS) if header != ZERO_HEADER}
    assert marked == set(range(0x45, 0x50))  # only IPv4 with a valid IHL


def test_vnet_tcp_without_options_is_marked() -> None:
    frame = ipv4_frame(PROTO_TCP)
    assert is_tcp_ipv4(frame)
    assert header_for(frame) == csum_header(34)


@pytest.mark.parametrize("words", [1, 2, 10])
def test_vnet_tcp_with_ip_options_moves_csum_start(words: int) -> None:
    frame = ipv4_frame(PROTO_TCP, options=b"\x01" * 4 * words)
    assert VnetHeader.unpack(header_for(frame)) == VnetHeader(
        flags=F_NEEDS_CSUM, csum_start=34 + 4 * words, csum_offset=16
    )


@pytest.mark.parametrize("flags_fragment", [0x4000, 0x0000, 0x8000])
def test_vnet_unfragmented_tcp_is_marked_whatever_df(flags_fragment: int) -> None:
    assert header_for(ipv4_frame(PROTO_TCP, flags_fragment=flags_fragment)) == csum_header(34)


@pytest.mark.parametrize(
    "flags_fragment",
    [0x2000, 0x6000, 0x0001, 0x0100, 0x1FFF, 0x4001, 0x3FFF],
    ids=["MF", "DF+MF", "offset 1", "offset 256", "offset max", "DF+offset", "MF+offset"],
)
def test_vnet_tcp_fragments_are_not_marked(flags_fragment: int) -> None:
    frame = ipv4_frame(PROTO_TCP, flags_fragment=flags_fragment)
    assert not is_tcp_ipv4(frame)
    assert header_for(frame) == ZERO_HEADER


@pytest.mark.parametrize(
    "frame",
    [
        ipv4_frame(PROTO_UDP),
        ipv4_frame(PROTO_ICMP),
        ipv4_frame(PROTO_TCP, ethertype=ETHERTYPE_ARP),
        ipv4_frame(PROTO_TCP, ethertype=ETHERTYPE_IPV6),
        ipv4_frame(PROTO_TCP, ethertype=ETHERTYPE_VLAN),
        ipv4_frame(PROTO_TCP, version=6),
    ],
    ids=["udp", "icmp", "arp", "ipv6", "vlan", "ip version 6"],
)
def test_vnet_other_frames_get_the_zero_header(frame: bytes) -> None:
    assert header_for(frame) == ZERO_HEADER


@pytest.mark.parametrize("ihl", [0, 4])
def test_vnet_bad_ihl_gets_the_zero_header(ihl: int) -> None:
    frame = bytearray(ipv4_frame(PROTO_TCP))
    frame[14] = 0x40 | ihl
    assert is_tcp_ipv4(frame)  # it looks like TCP, but has no valid header length
    assert header_for(frame) == ZERO_HEADER


@pytest.mark.parametrize("length", [14, 23, 24, 53])
def test_vnet_frames_too_short_for_tcp_get_the_zero_header(length: int) -> None:
    frame = ipv4_frame(PROTO_TCP, payload=b"")
    assert len(frame) == 54
    assert header_for(frame) == csum_header(34)
    assert header_for(frame[:length]) == ZERO_HEADER


def test_vnet_header_for_accepts_memoryviews() -> None:
    frame = ipv4_frame(PROTO_TCP, options=b"\x00" * 8)
    assert header_for(memoryview(frame)) == header_for(frame) == csum_header(42)


def test_vnet_header_for_agrees_with_the_reference_on_mixed_frames() -> None:
    for frame in mixed_frames(7, 2000):
        assert header_for(frame) == expected_header(frame, offload=True), frame[:40].hex()

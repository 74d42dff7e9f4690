"""The virtio-net headers the agent writes before enclave-bound frames, and the classifier
that picks them (no TAP needed)."""

from __future__ import annotations

import struct

import pytest

from nitro_netd.enclave.tap import VNET_HDR_SIZE
from nitro_netd.enclave.vnet import (
    CSUM_HEADERS,
    F_NEEDS_CSUM,
    GSO_ACCEPTED_MASK,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    ZERO_HEADER,
    VnetHeader,
    csum_header,
    gso_header,
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
    VNET_GSO_TCPV6,
    VNET_GSO_UDP,
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


# --- segmentation offload (GSO headers) ------------------------------------------------

GSO_SIZE = 1460
"""An MTU of 1500 less the IPv4 and TCP headers: what the agent passes as ``gso_size``."""


def test_vnet_gso_header_fields_for_a_plain_super_segment() -> None:
    frame = ipv4_frame(PROTO_TCP, payload=b"s" * 44 * GSO_SIZE)
    header = gso_header(frame, GSO_SIZE)
    # flags=NEEDS_CSUM, gso_type=TCPV4, hdr_len=54, gso_size=1460, csum_start=34, offset=16
    assert header == bytes.fromhex("01 01 3600 b405 2200 1000")
    assert VnetHeader.unpack(header) == VnetHeader(
        flags=F_NEEDS_CSUM,
        gso_type=GSO_TCPV4,
        hdr_len=54,
        gso_size=GSO_SIZE,
        csum_start=34,
        csum_offset=16,
    )


@pytest.mark.parametrize("ip_words", [0, 1, 10])
@pytest.mark.parametrize("tcp_words", [0, 3, 10])
def test_vnet_gso_header_reads_ihl_and_tcp_data_offset(ip_words: int, tcp_words: int) -> None:
    frame = ipv4_frame(
        PROTO_TCP,
        payload=b"o" * 5000,
        options=b"\x01" * 4 * ip_words,
        tcp_options=b"\x01" * 4 * tcp_words,
    )
    header = VnetHeader.unpack(gso_header(frame, 1448))
    csum_start = 14 + 20 + 4 * ip_words
    assert (header.csum_start, header.hdr_len) == (csum_start, csum_start + 20 + 4 * tcp_words)
    assert (header.flags, header.gso_type, header.gso_size, header.csum_offset) == (
        F_NEEDS_CSUM, GSO_TCPV4, 1448, 16,
    )  # fmt: skip
    assert gso_header(memoryview(frame), 1448) == gso_header(frame, 1448)


def test_vnet_gso_types_the_tap_may_hand_over() -> None:
    """Only a TCP/IPv4 type (with or without ECN) passes `GSO_ACCEPTED_MASK`."""
    assert (GSO_NONE, GSO_TCPV4, GSO_ECN) == (0, 1, 0x80)
    assert GSO_TCPV4 & GSO_ACCEPTED_MASK == 0
    assert (GSO_TCPV4 | GSO_ECN) & GSO_ACCEPTED_MASK == 0
    assert VNET_GSO_UDP & GSO_ACCEPTED_MASK
    assert VNET_GSO_TCPV6 & GSO_ACCEPTED_MASK
    assert (VNET_GSO_TCPV6 | GSO_ECN) & GSO_ACCEPTED_MASK


def test_vnet_header_for_with_gso_size_picks_by_length() -> None:
    one_segment = ipv4_frame(PROTO_TCP, payload=b"a" * GSO_SIZE)
    just_over = ipv4_frame(PROTO_TCP, payload=b"b" * (GSO_SIZE + 1))
    super_segment = ipv4_frame(PROTO_TCP, payload=b"c" * 64000)
    assert len(one_segment) == GSO_SIZE + 54
    assert header_for(one_segment, GSO_SIZE) == csum_header(34)
    assert header_for(just_over, GSO_SIZE) == gso_header(just_over, GSO_SIZE)
    assert header_for(super_segment, GSO_SIZE) == gso_header(super_segment, GSO_SIZE)
    assert VnetHeader.unpack(header_for(super_segment, GSO_SIZE)).gso_type == GSO_TCPV4
    assert header_for(super_segment) == csum_header(34)  # no gso_size: never a GSO header


@pytest.mark.parametrize(
    "frame",
    [
        ipv4_frame(PROTO_UDP, payload=b"u" * 9000),
        ipv4_frame(PROTO_ICMP, payload=b"i" * 9000),
        ipv4_frame(PROTO_TCP, payload=b"f" * 9000, flags_fragment=0x2000),
        ipv4_frame(PROTO_TCP, payload=b"v" * 9000, ethertype=ETHERTYPE_IPV6),
    ],
    ids=["udp", "icmp", "tcp fragment", "ipv6"],
)
def test_vnet_header_for_with_gso_size_leaves_other_big_frames_plain(frame: bytes) -> None:
    assert header_for(frame, GSO_SIZE) == ZERO_HEADER


def test_vnet_header_for_with_gso_size_agrees_with_the_reference_on_mixed_frames() -> None:
    gso = 0
    for frame in mixed_frames(8, 2000):
        expected = expected_header(frame, offload=True, gso_size=GSO_SIZE)
        assert header_for(frame, GSO_SIZE) == expected, frame[:60].hex()
        gso += expected[1] == GSO_TCPV4
    assert gso > 100


def _with_byte(frame: bytes, index: int, value: int) -> bytes:
    changed = bytearray(frame)
    changed[index] = value
    return bytes(changed)


@pytest.mark.parametrize(
    ("first_byte", "expected"),
    [(0x44, ZERO_HEADER), (0x65, ZERO_HEADER), (0x00, ZERO_HEADER)],
    ids=["ihl 4", "version 6", "zero"],
)
def test_vnet_gso_header_of_an_invalid_ipv4_header_is_the_plain_one(
    first_byte: int, expected: bytes
) -> None:
    frame = _with_byte(ipv4_frame(PROTO_TCP, payload=b"x" * 9000), 14, first_byte)
    assert gso_header(frame, GSO_SIZE) == expected
    assert header_for(frame, GSO_SIZE) == expected


@pytest.mark.parametrize("tcp_offset_byte", [0x00, 0x40, 0xF0])
def test_vnet_gso_header_with_a_tcp_header_beyond_the_frame_is_the_csum_one(
    tcp_offset_byte: int,
) -> None:
    """A data offset below 5 words, or one reaching past a short frame: no GSO header."""
    frame = ipv4_frame(PROTO_TCP, payload=b"", options=b"\x01" * 40)  # IHL 15, 94 bytes
    frame = _with_byte(frame, 14 + 60 + 12, tcp_offset_byte)
    header = gso_header(frame, 28)  # the MTU 68 gso_size: even this tiny frame is "big"
    assert header == csum_header(74)


def test_vnet_gso_header_never_raises_on_short_frames() -> None:
    frame = ipv4_frame(PROTO_TCP, payload=b"", options=b"\x01" * 40)[:80]  # TCP header cut
    assert gso_header(frame, 28) == csum_header(74)

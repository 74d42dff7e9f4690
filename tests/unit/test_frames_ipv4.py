"""IPv4 headers (RFC 791) and the TCP/UDP pseudo-header."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames.checksum import internet_checksum
from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.ipv4 import (
    DEFAULT_TTL,
    IPV4_HEADER_LEN,
    IpProto,
    IPv4Header,
    build_ipv4_header,
    parse_ipv4,
    pseudo_header_sum,
)

ipv4s = st.integers(0, 2**32 - 1).map(IPv4Address)
SRC = IPv4Address("10.0.0.2")
DST = IPv4Address("93.184.216.34")


def raw_header(
    *,
    version: int = 4,
    ihl: int = 5,
    total: int | None = None,
    flags_frag: int = 0x4000,
    payload: bytes = b"",
    options: bytes = b"",
    fix_checksum: bool = True,
) -> bytes:
    """An IPv4 packet with any field values, checksummed unless told not to."""
    if total is None:
        total = IPV4_HEADER_LEN + len(options) + len(payload)
    fields = ((version << 4) | ihl, 0, total, 7, flags_frag, 64, 17, 0, SRC.packed, DST.packed)
    header = bytearray(struct.pack("!BBHHHBBH4s4s", *fields) + options)
    if fix_checksum:
        struct.pack_into("!H", header, 10, internet_checksum(header[: ihl * 4]))
    return bytes(header) + payload


@given(
    source=ipv4s,
    destination=ipv4s,
    protocol=st.integers(0, 255),
    payload=st.binary(max_size=1500),
    ttl=st.integers(0, 255),
    identification=st.integers(0, 0xFFFF),
    dont_fragment=st.booleans(),
)
def test_ipv4_build_then_parse(
    source: IPv4Address,
    destination: IPv4Address,
    protocol: int,
    payload: bytes,
    ttl: int,
    identification: int,
    dont_fragment: bool,
) -> None:
    header = build_ipv4_header(
        source,
        destination,
        protocol,
        len(payload),
        ttl=ttl,
        identification=identification,
        dont_fragment=dont_fragment,
    )
    assert len(header) == IPV4_HEADER_LEN
    parsed, body = parse_ipv4(header + payload)
    total = IPV4_HEADER_LEN + len(payload)
    assert parsed == IPv4Header(
        source, destination, protocol, ttl, total, IPV4_HEADER_LEN, identification, dont_fragment
    )
    assert bytes(body) == payload


@given(payload=st.binary(max_size=46), padding=st.binary(min_size=1, max_size=46))
def test_ipv4_ethernet_padding_trimmed_by_total_length(payload: bytes, padding: bytes) -> None:
    packet = build_ipv4_header(SRC, DST, IpProto.UDP, len(payload)) + payload + padding
    parsed, body = parse_ipv4(packet)
    assert parsed.total_length == IPV4_HEADER_LEN + len(payload)
    assert bytes(body) == payload


def test_ipv4_build_defaults() -> None:
    parsed, _ = parse_ipv4(build_ipv4_header(SRC, DST, IpProto.TCP, 0))
    assert parsed.ttl == DEFAULT_TTL
    assert parsed.dont_fragment
    assert parsed.protocol == IpProto.TCP


def test_ipv4_build_too_long() -> None:
    build_ipv4_header(SRC, DST, IpProto.UDP, 0xFFFF - IPV4_HEADER_LEN)
    with pytest.raises(ValueError, match="65536"):
        build_ipv4_header(SRC, DST, IpProto.UDP, 0xFFFF - IPV4_HEADER_LEN + 1)


def test_ipv4_known_header() -> None:
    # The header of a UDP packet 192.168.0.1 -> 192.168.0.199 (checksum 0xb861).
    header = bytes.fromhex("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7")
    parsed, body = parse_ipv4(header + b"\x00" * (0x73 - 20))
    assert parsed.source == IPv4Address("192.168.0.1")
    assert parsed.destination == IPv4Address("192.168.0.199")
    assert (parsed.protocol, parsed.ttl, parsed.total_length) == (IpProto.UDP, 64, 0x73)
    assert len(body) == 0x73 - 20
    assert build_ipv4_header(parsed.source, parsed.destination, 17, len(body)) == header


def test_ipv4_options_are_skipped() -> None:
    options = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    parsed, body = parse_ipv4(raw_header(ihl=6, options=options, payload=b"data"))
    assert parsed.header_length == 24
    assert bytes(body) == b"data"


@pytest.mark.parametrize("length", [0, 1, IPV4_HEADER_LEN - 1])
def test_ipv4_truncated_header(length: int) -> None:
    with pytest.raises(FrameError) as info:
        parse_ipv4(raw_header()[:length])
    assert info.value.reason is DropReason.TRUNCATED


def test_ipv4_total_length_past_the_data() -> None:
    with pytest.raises(FrameError) as info:
        parse_ipv4(raw_header(total=30, payload=b"123456789"))
    assert info.value.reason is DropReason.TRUNCATED
    assert "total_length=30" in str(info.value)


def test_ipv4_total_length_below_the_header() -> None:
    with pytest.raises(FrameError) as info:
        parse_ipv4(raw_header(total=19, payload=b"x"))
    assert info.value.reason is DropReason.TRUNCATED


@pytest.mark.parametrize(("version", "ihl"), [(6, 5), (0, 5), (4, 0), (4, 4)])
def test_ipv4_bad_version_or_ihl(version: int, ihl: int) -> None:
    with pytest.raises(FrameError) as info:
        parse_ipv4(raw_header(version=version, ihl=ihl, payload=b"x" * 8))
    assert info.value.reason is DropReason.BAD_HEADER


def test_ipv4_ihl_past_total_length() -> None:
    with pytest.raises(FrameError) as info:
        parse_ipv4(raw_header(ihl=15, payload=b"x" * 8))
    assert info.value.reason is DropReason.TRUNCATED


def test_ipv4_bad_checksum() -> None:
    good = bytearray(raw_header(payload=b"abc"))
    good[10] ^= 0x01
    with pytest.raises(FrameError) as info:
        parse_ipv4(good)
    assert info.value.reason is DropReason.BAD_CHECKSUM


def test_ipv4_checksum_covers_only_the_header() -> None:
    packet = bytearray(raw_header(payload=b"abc"))
    packet[-1] ^= 0xFF
    _, body = parse_ipv4(packet)
    assert bytes(body) == b"ab" + bytes([ord("c") ^ 0xFF])


@pytest.mark.parametrize("flags_frag", [0x2000, 0x6000, 0x0001, 0x4001, 0x1FFF, 0x3FFF])
def test_ipv4_fragments_refused(flags_frag: int) -> None:
    with pytest.raises(FrameError) as info:
        parse_ipv4(raw_header(flags_frag=flags_frag, payload=b"x" * 8))
    assert info.value.reason is DropReason.FRAGMENT


@pytest.mark.parametrize(("flags_frag", "dont_fragment"), [(0x0000, False), (0x4000, True)])
def test_ipv4_unfragmented_accepted(flags_frag: int, dont_fragment: bool) -> None:
    parsed, _ = parse_ipv4(raw_header(flags_frag=flags_frag))
    assert parsed.dont_fragment is dont_fragment


@settings(max_examples=300)
@given(data=st.binary(max_size=80))
def test_ipv4_arbitrary_bytes_parse_or_frame_error(data: bytes) -> None:
    try:
        header, body = parse_ipv4(data)
    except FrameError:
        return
    assert header.header_length + len(body) == header.total_length <= len(data)


@settings(max_examples=300)
@given(
    payload=st.binary(max_size=40),
    index=st.integers(0, 59),
    value=st.integers(0, 255),
    fix_checksum=st.booleans(),
)
def test_ipv4_corrupted_packet_parses_or_frame_error(
    payload: bytes, index: int, value: int, fix_checksum: bool
) -> None:
    packet = bytearray(build_ipv4_header(SRC, DST, IpProto.TCP, len(payload)) + payload)
    packet[index % len(packet)] = value
    if fix_checksum:
        packet[10:12] = b"\x00\x00"
        ihl = min((packet[0] & 0xF) * 4, len(packet))
        struct.pack_into("!H", packet, 10, internet_checksum(packet[:ihl]))
    try:
        header, body = parse_ipv4(packet)
    except FrameError:
        return
    assert bytes(body) == bytes(packet[header.header_length : header.total_length])


def test_pseudo_header_sum() -> None:
    # 10.0.0.2 + 93.184.216.34 + (0, 6) + 40, summed by hand as 16-bit words.
    words = [0x0A00, 0x0002, 0x5DB8, 0xD822, 0x0006, 40]
    total = sum(words)
    total = (total & 0xFFFF) + (total >> 16)
    assert pseudo_header_sum(SRC, DST, IpProto.TCP, 40) == total

"""UDP over IPv4 (RFC 768)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.udp import MAX_UDP_LEN, UDP_HEADER_LEN, UdpHeader, build_udp, parse_udp

ipv4s = st.integers(0, 2**32 - 1).map(IPv4Address)
ports = st.integers(0, 0xFFFF)
SRC = IPv4Address("10.0.0.2")
DST = IPv4Address("10.0.0.1")


def reference_checksum(source: IPv4Address, destination: IPv4Address, datagram: bytes) -> int:
    """RFC 768: one's complement of the sum over pseudo-header, header and data."""
    pseudo = source.packed + destination.packed + bytes([0, 17]) + len(datagram).to_bytes(2, "big")
    data = pseudo + datagram[:6] + b"\x00\x00" + datagram[8:]
    data += b"\x00" * (len(data) % 2)
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF) or 0xFFFF


@given(
    source=ipv4s,
    destination=ipv4s,
    source_port=ports,
    destination_port=ports,
    payload=st.binary(max_size=1500),
)
def test_udp_ipv4_build_then_parse(
    source: IPv4Address,
    destination: IPv4Address,
    source_port: int,
    destination_port: int,
    payload: bytes,
) -> None:
    datagram = build_udp(source, destination, source_port, destination_port, payload)
    checksum = reference_checksum(source, destination, datagram)
    assert datagram[:8] == struct.pack(
        "!HHHH", source_port, destination_port, UDP_HEADER_LEN + len(payload), checksum
    )
    header, body = parse_udp(datagram, source=source, destination=destination)
    assert header == UdpHeader(source_port, destination_port, len(datagram), checksum)
    assert bytes(body) == payload


def test_udp_ipv4_known_datagram() -> None:
    # A DNS query header's first bytes from 10.0.0.2:53000 to 10.0.0.1:53.
    payload = bytes.fromhex("abcd01000001000000000000")
    datagram = build_udp(SRC, DST, 53000, 53, payload)
    assert (
        datagram.hex()
        == "cf080035" + "0014" + f"{reference_checksum(SRC, DST, datagram):04x}" + payload.hex()
    )


def test_udp_ipv4_computed_zero_is_sent_as_ffff() -> None:
    # With a two-byte payload equal to the checksum of a zero payload, the sum is 0xffff.
    first = build_udp(SRC, DST, 1234, 5678, b"\x00\x00")
    datagram = build_udp(SRC, DST, 1234, 5678, first[6:8])
    assert datagram[6:8] == b"\xff\xff"
    header, body = parse_udp(datagram, source=SRC, destination=DST)
    assert header.checksum == 0xFFFF
    assert bytes(body) == first[6:8]


@given(payload=st.binary(max_size=100))
def test_udp_ipv4_zero_checksum_means_none(payload: bytes) -> None:
    datagram = bytearray(build_udp(SRC, DST, 1, 2, payload))
    datagram[6:8] = b"\x00\x00"
    header, body = parse_udp(datagram, source=IPv4Address("1.2.3.4"), destination=DST)
    assert header.checksum == 0
    assert bytes(body) == payload


@settings(max_examples=200)
@given(payload=st.binary(max_size=200), index=st.integers(0, 300), flip=st.integers(1, 255))
def test_udp_ipv4_changed_byte_fails(payload: bytes, index: int, flip: int) -> None:
    datagram = bytearray(build_udp(SRC, DST, 1, 2, payload))
    index %= len(datagram)
    datagram[index] ^= flip
    if 4 <= index < 8:  # the length or the checksum: some values are valid again
        try:
            header, _ = parse_udp(datagram, source=SRC, destination=DST)
        except FrameError as exc:
            reason = exc.reason
        else:
            assert header.checksum == 0 or header.length < len(datagram)
            return
        assert reason in {DropReason.BAD_HEADER, DropReason.TRUNCATED, DropReason.BAD_CHECKSUM}
        return
    with pytest.raises(FrameError) as info:
        parse_udp(datagram, source=SRC, destination=DST)
    assert info.value.reason is DropReason.BAD_CHECKSUM


def test_udp_ipv4_wrong_pseudo_header_fails() -> None:
    datagram = build_udp(SRC, DST, 1, 2, b"hello")
    for source, destination in [(DST, DST), (SRC, SRC), (IPv4Address("10.0.0.3"), DST)]:
        with pytest.raises(FrameError) as info:
            parse_udp(datagram, source=source, destination=destination)
        assert info.value.reason is DropReason.BAD_CHECKSUM


@pytest.mark.parametrize("length", [0, 1, UDP_HEADER_LEN - 1])
def test_udp_ipv4_truncated_header(length: int) -> None:
    with pytest.raises(FrameError) as info:
        parse_udp(build_udp(SRC, DST, 1, 2, b"")[:length], source=SRC, destination=DST)
    assert info.value.reason is DropReason.TRUNCATED


@pytest.mark.parametrize("length_field", [0, 7])
def test_udp_ipv4_length_field_below_header(length_field: int) -> None:
    datagram = struct.pack("!HHHH", 1, 2, length_field, 0) + b"data"
    with pytest.raises(FrameError) as info:
        parse_udp(datagram, source=SRC, destination=DST)
    assert info.value.reason is DropReason.BAD_HEADER


def test_udp_ipv4_length_field_past_the_data() -> None:
    datagram = struct.pack("!HHHH", 1, 2, 13, 0) + b"data"
    with pytest.raises(FrameError) as info:
        parse_udp(datagram, source=SRC, destination=DST)
    assert info.value.reason is DropReason.TRUNCATED
    assert "13" in str(info.value)


@given(payload=st.binary(max_size=50), trailer=st.binary(min_size=1, max_size=20))
def test_udp_ipv4_bytes_past_the_length_field_ignored(payload: bytes, trailer: bytes) -> None:
    datagram = build_udp(SRC, DST, 1, 2, payload)
    header, body = parse_udp(datagram + trailer, source=SRC, destination=DST)
    assert header.length == len(datagram)
    assert bytes(body) == payload


def test_udp_ipv4_build_largest_and_too_large() -> None:
    payload = bytes(MAX_UDP_LEN - UDP_HEADER_LEN)
    header, body = parse_udp(build_udp(SRC, DST, 1, 2, payload), source=SRC, destination=DST)
    assert header.length == MAX_UDP_LEN
    assert len(body) == len(payload)
    with pytest.raises(ValueError, match="65536"):
        build_udp(SRC, DST, 1, 2, payload + b"x")


@settings(max_examples=300)
@given(data=st.binary(max_size=40), source=ipv4s, destination=ipv4s)
def test_udp_ipv4_arbitrary_bytes_parse_or_frame_error(
    data: bytes, source: IPv4Address, destination: IPv4Address
) -> None:
    try:
        header, body = parse_udp(data, source=source, destination=destination)
    except FrameError:
        return
    assert UDP_HEADER_LEN + len(body) == header.length <= len(data)

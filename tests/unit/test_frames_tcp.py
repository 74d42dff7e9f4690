"""TCP over IPv4 (RFC 9293 §3.1) and its SYN options (RFC 7323, RFC 2018)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames.checksum import internet_checksum
from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.ipv4 import IpProto, pseudo_header_sum
from nitro_netd.frames.tcp import (
    MAX_TCP_LEN,
    TCP_HEADER_LEN,
    TcpFlags,
    TcpHeader,
    TcpOptions,
    build_tcp,
    build_tcp_options,
    parse_tcp,
    parse_tcp_options,
)

ipv4s = st.integers(0, 2**32 - 1).map(IPv4Address)
ports = st.integers(0, 0xFFFF)
u32 = st.integers(0, 2**32 - 1)
tcp_options = st.builds(
    TcpOptions,
    mss=st.none() | st.integers(0, 0xFFFF),
    window_scale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
    timestamps=st.none() | st.tuples(u32, u32),
)
SRC = IPv4Address("10.0.0.2")
DST = IPv4Address("93.184.216.34")

# The options of a Linux SYN: MSS 1460, SACK-permitted, timestamps, NOP, window scale 7.
LINUX_SYN_OPTIONS = bytes.fromhex("020405b4 0402080a 0001e240 00000000 01030307")


def reference_checksum(source: IPv4Address, destination: IPv4Address, segment: bytes) -> int:
    pseudo = source.packed + destination.packed + bytes([0, 6]) + len(segment).to_bytes(2, "big")
    data = pseudo + segment[:16] + b"\x00\x00" + segment[18:]
    data += b"\x00" * (len(data) % 2)
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def raw_segment(options: bytes, *, payload: bytes = b"", data_offset: int | None = None) -> bytes:
    """A SYN with `options` copied verbatim (padded with EOL) and a correct checksum."""
    options += b"\x00" * (-len(options) % 4)
    if data_offset is None:
        data_offset = (TCP_HEADER_LEN + len(options)) // 4
    fields = (40000, 443, 1, 0, data_offset << 4, TcpFlags.SYN, 64240, 0, 0)
    segment = bytearray(struct.pack("!HHIIBBHHH", *fields) + options + payload)
    initial = pseudo_header_sum(SRC, DST, IpProto.TCP, len(segment))
    struct.pack_into("!H", segment, 16, internet_checksum(segment, initial))
    return bytes(segment)


def parse(segment: bytes | bytearray, *, verify_checksum: bool = True) -> TcpHeader:
    return parse_tcp(segment, source=SRC, destination=DST, verify_checksum=verify_checksum)[0]


@given(
    source=ipv4s,
    destination=ipv4s,
    source_port=ports,
    destination_port=ports,
    seq=u32,
    ack=u32,
    flags=st.integers(0, 255).map(TcpFlags),
    window=st.integers(0, 0xFFFF),
    options=st.none() | tcp_options,
    payload=st.binary(max_size=1500),
)
def test_tcp_ipv4_build_then_parse(
    source: IPv4Address,
    destination: IPv4Address,
    source_port: int,
    destination_port: int,
    seq: int,
    ack: int,
    flags: TcpFlags,
    window: int,
    options: TcpOptions | None,
    payload: bytes,
) -> None:
    segment = build_tcp(
        source,
        destination,
        source_port,
        destination_port,
        seq,
        ack,
        flags,
        window,
        options,
        payload,
    )
    header_length = len(segment) - len(payload)
    assert header_length % 4 == 0
    assert TCP_HEADER_LEN <= header_length <= 60
    assert segment[16:18] == reference_checksum(source, destination, segment).to_bytes(2, "big")
    header, body = parse_tcp(segment, source=source, destination=destination)
    assert header == TcpHeader(
        source_port,
        destination_port,
        seq,
        ack,
        flags,
        window,
        header_length // 4,
        options or TcpOptions(),
    )
    assert header.header_length == header_length
    assert bytes(body) == payload


def test_tcp_ipv4_no_options_is_a_bare_header() -> None:
    segment = build_tcp(SRC, DST, 1, 2, 3, 4, TcpFlags.ACK | TcpFlags.PSH, 5, payload=b"hi")
    assert len(segment) == TCP_HEADER_LEN + 2
    assert segment[12] == 5 << 4
    assert segment[13] == 0x18
    header = parse(segment)
    assert header.flags == TcpFlags.ACK | TcpFlags.PSH
    assert header.options == TcpOptions()


def test_tcp_options_linux_syn_layout() -> None:
    options = TcpOptions(mss=1460, window_scale=7, sack_permitted=True, timestamps=(123456, 0))
    assert build_tcp_options(options) == LINUX_SYN_OPTIONS
    assert parse_tcp_options(LINUX_SYN_OPTIONS) == options
    header = parse(raw_segment(LINUX_SYN_OPTIONS))
    assert header.data_offset == 10
    assert header.flags == TcpFlags.SYN
    assert header.options == options


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", TcpOptions()),
        (b"\x01\x01\x01\x01", TcpOptions()),
        (b"\x00\x02\x04\x05\xb4", TcpOptions()),  # nothing after EOL is read
        (b"\x02\x04\x05\xb4\x00\xff\xff\xff", TcpOptions(mss=1460)),
        (b"\x1e\x04\xaa\xbb\x02\x04\x05\xb4", TcpOptions(mss=1460)),  # unknown kind skipped
        (b"\x05\x0a" + bytes(8) + b"\x04\x02", TcpOptions(sack_permitted=True)),  # SACK block
        (b"\x03\x03\x0f", TcpOptions(window_scale=14)),  # RFC 7323 §2.3: 15 is used as 14
        (b"\x03\x03\xff", TcpOptions(window_scale=14)),
        (b"\x02\x04\x01\x00\x02\x04\x02\x00", TcpOptions(mss=512)),  # the last one wins
    ],
)
def test_tcp_options_parse(raw: bytes, expected: TcpOptions) -> None:
    assert parse_tcp_options(raw) == expected
    assert parse(raw_segment(raw)).options == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"\x02",  # a kind with no length byte
        b"\x01\x01\x01\x02",
        b"\x02\x03\x05\xb4",  # MSS of length 3
        b"\x02\x05\x05\xb4\x00",
        b"\x03\x04\x07\x00",  # window scale of length 4
        b"\x04\x03\x00\x00",  # SACK-permitted of length 3
        b"\x08\x08" + bytes(6),  # timestamps of length 8
        b"\x1e\x00\x00\x00",  # unknown kind, length 0
        b"\x1e\x01\x00\x00",  # unknown kind, length 1
        b"\x1e\x08\x00\x00",  # unknown kind past the option area
        b"\x01\x08\x0a" + bytes(5),  # timestamps past the option area
    ],
)
def test_tcp_options_malformed(raw: bytes) -> None:
    with pytest.raises(FrameError) as info:
        parse_tcp_options(raw)
    assert info.value.reason is DropReason.BAD_HEADER
    with pytest.raises(FrameError) as info:
        parse(raw_segment(raw.ljust(-(-len(raw) // 4) * 4, b"\x01")))
    assert info.value.reason is DropReason.BAD_HEADER


@pytest.mark.parametrize("data_offset", [0, 1, 4])
def test_tcp_ipv4_data_offset_below_five(data_offset: int) -> None:
    with pytest.raises(FrameError) as info:
        parse(raw_segment(b"", payload=b"x" * 40, data_offset=data_offset))
    assert info.value.reason is DropReason.BAD_HEADER


@pytest.mark.parametrize(("data_offset", "payload"), [(6, b""), (15, b"x" * 39)])
def test_tcp_ipv4_data_offset_past_the_end(data_offset: int, payload: bytes) -> None:
    with pytest.raises(FrameError) as info:
        parse(raw_segment(b"", payload=payload, data_offset=data_offset))
    assert info.value.reason is DropReason.TRUNCATED


def test_tcp_ipv4_data_offset_fifteen_fits() -> None:
    header, body = parse_tcp(
        raw_segment(b"\x01" * 40, payload=b"data"), source=SRC, destination=DST
    )
    assert (header.data_offset, header.header_length) == (15, 60)
    assert bytes(body) == b"data"


@pytest.mark.parametrize("length", [0, 1, TCP_HEADER_LEN - 1])
def test_tcp_ipv4_truncated_header(length: int) -> None:
    with pytest.raises(FrameError) as info:
        parse(build_tcp(SRC, DST, 1, 2, 3, 4, TcpFlags.ACK, 5)[:length])
    assert info.value.reason is DropReason.TRUNCATED


@settings(max_examples=200)
@given(payload=st.binary(max_size=200), index=st.integers(0, 300), flip=st.integers(1, 255))
def test_tcp_ipv4_changed_byte_fails_the_checksum(payload: bytes, index: int, flip: int) -> None:
    segment = bytearray(build_tcp(SRC, DST, 1, 2, 3, 4, TcpFlags.ACK, 5, payload=payload))
    index %= len(segment)
    if index == 12:  # the data offset: that is checked first
        return
    segment[index] ^= flip
    with pytest.raises(FrameError) as info:
        parse(segment)
    assert info.value.reason is DropReason.BAD_CHECKSUM
    header, body = parse_tcp(segment, source=SRC, destination=DST, verify_checksum=False)
    assert header.data_offset == 5
    assert bytes(body) == bytes(segment[TCP_HEADER_LEN:])


def test_tcp_ipv4_wrong_pseudo_header_fails() -> None:
    segment = build_tcp(SRC, DST, 1, 2, 3, 4, TcpFlags.SYN, 5)
    for source, destination in [(SRC, SRC), (IPv4Address("10.0.0.3"), DST)]:
        with pytest.raises(FrameError) as info:
            parse_tcp(segment, source=source, destination=destination)
        assert info.value.reason is DropReason.BAD_CHECKSUM


def test_tcp_ipv4_build_largest_and_too_large() -> None:
    payload = bytes(MAX_TCP_LEN - TCP_HEADER_LEN)
    _, body = parse_tcp(
        build_tcp(SRC, DST, 1, 2, 3, 4, TcpFlags.ACK, 5, payload=payload),
        source=SRC,
        destination=DST,
    )
    assert len(body) == len(payload)
    with pytest.raises(ValueError, match="65536"):
        build_tcp(SRC, DST, 1, 2, 3, 4, TcpFlags.ACK, 5, payload=payload + b"x")


def test_tcp_ipv4_oversized_input_is_a_frame_error() -> None:
    with pytest.raises(FrameError) as info:
        parse(bytes(MAX_TCP_LEN + 1))
    assert info.value.reason is DropReason.BAD_HEADER


@settings(max_examples=300)
@given(data=st.binary(max_size=80), verify_checksum=st.booleans())
def test_tcp_ipv4_arbitrary_bytes_parse_or_frame_error(data: bytes, verify_checksum: bool) -> None:
    try:
        header, body = parse_tcp(data, source=SRC, destination=DST, verify_checksum=verify_checksum)
    except FrameError:
        return
    assert header.header_length + len(body) == len(data)
    assert 0 <= (header.options.window_scale or 0) <= 14


@settings(max_examples=300)
@given(data=st.binary(max_size=40))
def test_tcp_options_arbitrary_bytes_parse_or_frame_error(data: bytes) -> None:
    try:
        options = parse_tcp_options(data)
    except FrameError as exc:
        reason = exc.reason
    else:
        assert options.mss is None or 0 <= options.mss <= 0xFFFF
        assert options.window_scale is None or 0 <= options.window_scale <= 14
        return
    assert reason is DropReason.BAD_HEADER


@settings(max_examples=200)
@given(options=tcp_options, index=st.integers(0, 60), value=st.integers(0, 255))
def test_tcp_ipv4_corrupted_options_parse_or_frame_error(
    options: TcpOptions, index: int, value: int
) -> None:
    raw = bytearray(build_tcp_options(options) or b"\x01\x01\x01\x01")
    raw[index % len(raw)] = value
    try:
        header = parse(raw_segment(bytes(raw)))
    except FrameError as exc:
        reason = exc.reason
    else:
        assert header.data_offset == 5 + len(raw) // 4
        return
    assert reason is DropReason.BAD_HEADER

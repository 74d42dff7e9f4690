"""ICMP for IPv4 (RFC 792)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.icmp import (
    ICMP_HEADER_LEN,
    IcmpMessage,
    IcmpType,
    UnreachableCode,
    build_icmp,
    parse_icmp,
)

messages = st.builds(
    IcmpMessage,
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.binary(max_size=1500),
)

# An echo request (checksum left zero here): id 0x1c46, seq 1, eight bytes of "a".
ECHO_REQUEST = bytes.fromhex("0800 0000 1c46 0001 6161616161616161")


def reference_checksum(data: bytes) -> int:
    data += b"\x00" * (len(data) % 2)
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(message=messages)
def test_icmp_build_then_parse(message: IcmpMessage) -> None:
    raw = build_icmp(message)
    assert len(raw) == ICMP_HEADER_LEN + len(message.payload)
    assert parse_icmp(raw) == message


def test_icmp_known_echo_request() -> None:
    message = IcmpMessage(IcmpType.ECHO_REQUEST, 0, 0x1C46, 1, b"a" * 8)
    raw = build_icmp(message)
    expected_checksum = reference_checksum(ECHO_REQUEST)
    assert raw == ECHO_REQUEST[:2] + expected_checksum.to_bytes(2, "big") + ECHO_REQUEST[4:]
    assert parse_icmp(bytearray(raw)) == message


def test_icmp_destination_unreachable_carries_the_original_header() -> None:
    original = bytes(range(28))
    message = IcmpMessage(IcmpType.DEST_UNREACHABLE, UnreachableCode.PORT, 0, 0, original)
    parsed = parse_icmp(memoryview(build_icmp(message)))
    assert (parsed.type, parsed.code, parsed.payload) == (3, 3, original)


@settings(max_examples=300)
@given(message=messages, index=st.integers(0, 2000), flip=st.integers(1, 255))
def test_icmp_any_changed_byte_fails_the_checksum(
    message: IcmpMessage, index: int, flip: int
) -> None:
    raw = bytearray(build_icmp(message))
    raw[index % len(raw)] ^= flip
    with pytest.raises(FrameError) as info:
        parse_icmp(raw)
    assert info.value.reason is DropReason.BAD_CHECKSUM


@pytest.mark.parametrize("length", [0, 1, ICMP_HEADER_LEN - 1])
def test_icmp_truncated(length: int) -> None:
    with pytest.raises(FrameError) as info:
        parse_icmp(ECHO_REQUEST[:length])
    assert info.value.reason is DropReason.TRUNCATED


@settings(max_examples=300)
@given(data=st.binary(max_size=40))
def test_icmp_arbitrary_bytes_parse_or_frame_error(data: bytes) -> None:
    try:
        message = parse_icmp(data)
    except FrameError as exc:
        reason = exc.reason
    else:
        # The checksum may be either zero (0x0000 or 0xffff); everything else is kept.
        rebuilt = build_icmp(message)
        assert rebuilt[:2] + rebuilt[4:] == data[:2] + data[4:]
        return
    assert reason in {DropReason.TRUNCATED, DropReason.BAD_CHECKSUM}

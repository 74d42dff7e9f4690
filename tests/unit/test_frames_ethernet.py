"""Ethernet II frames and MAC addresses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.ethernet import (
    BROADCAST_MAC,
    ETHERNET_HEADER_LEN,
    EthernetHeader,
    EtherType,
    MacAddress,
    build_ethernet,
    parse_ethernet,
)

macs = st.binary(min_size=6, max_size=6).map(MacAddress)


@given(
    destination=macs,
    source=macs,
    ethertype=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=1600),
)
def test_ethernet_build_then_parse(
    destination: MacAddress, source: MacAddress, ethertype: int, payload: bytes
) -> None:
    frame = build_ethernet(destination, source, ethertype, payload)
    assert len(frame) == ETHERNET_HEADER_LEN + len(payload)
    header, rest = parse_ethernet(frame)
    assert header == EthernetHeader(destination, source, ethertype)
    assert bytes(rest) == payload


@settings(max_examples=300)
@given(data=st.binary(max_size=64))
def test_ethernet_arbitrary_bytes_parse_or_frame_error(data: bytes) -> None:
    if len(data) < ETHERNET_HEADER_LEN:
        with pytest.raises(FrameError) as info:
            parse_ethernet(data)
        assert info.value.reason is DropReason.TRUNCATED
        return
    header, rest = parse_ethernet(data)
    assert header.destination.octets == data[:6]
    assert header.source.octets == data[6:12]
    assert bytes(rest) == data[ETHERNET_HEADER_LEN:]


def test_ethernet_known_frame() -> None:
    frame = bytes.fromhex("ffffffffffff 020000000001 0806".replace(" ", "")) + b"payload"
    header, rest = parse_ethernet(bytearray(frame))
    assert header.destination == BROADCAST_MAC
    assert str(header.source) == "02:00:00:00:00:01"
    assert header.ethertype == EtherType.ARP
    assert bytes(rest) == b"payload"


def test_ethernet_accepts_memoryview_and_views_payload() -> None:
    frame = bytearray(build_ethernet(BROADCAST_MAC, BROADCAST_MAC, EtherType.IPV4, b"abc"))
    _, rest = parse_ethernet(memoryview(frame))
    frame[-1] = ord("z")
    assert bytes(rest) == b"abz"  # a view, not a copy


@pytest.mark.parametrize("length", [0, 1, 13])
def test_ethernet_truncated(length: int) -> None:
    with pytest.raises(FrameError) as info:
        parse_ethernet(b"\x00" * length)
    assert info.value.reason is DropReason.TRUNCATED
    assert str(length) in str(info.value)


def test_ethernet_header_only_has_empty_payload() -> None:
    header, rest = parse_ethernet(b"\x01" * 12 + b"\x86\xdd")
    assert header.ethertype == EtherType.IPV6
    assert len(rest) == 0


# --- MacAddress ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "octets"),
    [
        ("02:00:00:00:00:01", b"\x02\x00\x00\x00\x00\x01"),
        ("02-00-00-00-00-01", b"\x02\x00\x00\x00\x00\x01"),
        ("AA:bb:CC:dd:EE:ff", b"\xaa\xbb\xcc\xdd\xee\xff"),
        ("ff:ff:ff:ff:ff:ff", b"\xff" * 6),
    ],
)
def test_mac_parse_good(text: str, octets: bytes) -> None:
    assert MacAddress.parse(text) == MacAddress(octets)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:01:02",
        "2:0:0:0:0:1",
        "002:00:00:00:00:01",
        "0200.0000.0001",
        "020000000001",
        "gg:00:00:00:00:01",
        "+1:00:00:00:00:01",
        " 1:00:00:00:00:01",
        "0x:00:00:00:00:01",
        "\u0661\u0661:00:00:00:00:01",  # Arabic-Indic digits: int() would take them
        "02:00:00:00:00:01 ",
    ],
)
def test_mac_parse_bad(text: str) -> None:
    with pytest.raises(ValueError, match="not a MAC address"):
        MacAddress.parse(text)


@given(mac=macs)
def test_mac_str_then_parse(mac: MacAddress) -> None:
    text = str(mac)
    assert len(text) == 17
    assert MacAddress.parse(text) == mac
    assert MacAddress.parse(text.upper().replace(":", "-")) == mac


@settings(max_examples=300)
@given(text=st.text(max_size=20))
def test_mac_parse_arbitrary_text_value_error_or_round_trip(text: str) -> None:
    try:
        mac = MacAddress.parse(text)
    except ValueError:
        return
    assert str(mac) == text.lower().replace("-", ":")


@pytest.mark.parametrize("octets", [b"", b"\x00" * 5, b"\x00" * 7])
def test_mac_wrong_length(octets: bytes) -> None:
    with pytest.raises(ValueError, match="6 octets"):
        MacAddress(octets)


def test_mac_multicast_bit() -> None:
    assert BROADCAST_MAC.is_multicast
    assert MacAddress.parse("01:00:5e:00:00:01").is_multicast
    assert not MacAddress.parse("02:00:00:00:00:01").is_multicast

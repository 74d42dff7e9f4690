"""ARP for IPv4 over Ethernet (RFC 826)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames.arp import ARP_LEN, ArpOp, ArpPacket, build_arp, parse_arp
from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.ethernet import MacAddress

macs = st.binary(min_size=6, max_size=6).map(MacAddress)
ipv4s = st.integers(0, 2**32 - 1).map(IPv4Address)
packets = st.builds(ArpPacket, st.integers(0, 0xFFFF), macs, ipv4s, macs, ipv4s)

# A request as Linux sends it: who-has 10.0.0.1 tell 10.0.0.2.
REQUEST = bytes.fromhex(
    "0001 0800 06 04 0001 020000000002 0a000002 000000000000 0a000001".replace(" ", "")
)


@given(packet=packets)
def test_arp_build_then_parse(packet: ArpPacket) -> None:
    raw = build_arp(packet)
    assert len(raw) == ARP_LEN
    assert parse_arp(raw) == packet


@given(packet=packets, padding=st.binary(max_size=18))
def test_arp_ignores_ethernet_padding(packet: ArpPacket, padding: bytes) -> None:
    assert parse_arp(build_arp(packet) + padding) == packet


def test_arp_known_request() -> None:
    packet = parse_arp(REQUEST)
    assert packet == ArpPacket(
        ArpOp.REQUEST,
        MacAddress.parse("02:00:00:00:00:02"),
        IPv4Address("10.0.0.2"),
        MacAddress(b"\x00" * 6),
        IPv4Address("10.0.0.1"),
    )
    assert build_arp(packet) == REQUEST


@pytest.mark.parametrize("length", [0, 8, ARP_LEN - 1])
def test_arp_truncated(length: int) -> None:
    with pytest.raises(FrameError) as info:
        parse_arp(REQUEST[:length])
    assert info.value.reason is DropReason.TRUNCATED


@pytest.mark.parametrize(
    ("htype", "ptype", "hlen", "plen"),
    [(6, 0x0800, 6, 4), (1, 0x86DD, 6, 16), (1, 0x0800, 8, 4), (1, 0x0800, 6, 6)],
)
def test_arp_not_ethernet_ipv4(htype: int, ptype: int, hlen: int, plen: int) -> None:
    raw = struct.pack("!HHBB", htype, ptype, hlen, plen) + REQUEST[6:]
    with pytest.raises(FrameError) as info:
        parse_arp(raw)
    assert info.value.reason is DropReason.UNSUPPORTED_ARP


@settings(max_examples=300)
@given(data=st.binary(max_size=40) | st.binary(max_size=40).map(lambda b: REQUEST[:8] + b))
def test_arp_arbitrary_bytes_parse_or_frame_error(data: bytes) -> None:
    try:
        packet = parse_arp(data)
    except FrameError as exc:
        reason = exc.reason
    else:
        assert build_arp(packet) == data[:ARP_LEN]
        return
    assert reason in {DropReason.TRUNCATED, DropReason.UNSUPPORTED_ARP}

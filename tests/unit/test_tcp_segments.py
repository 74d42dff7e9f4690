"""`SegmentBuilder`: the frames the translator sends to the enclave, checked field by field
and against the general codecs, on both its paths (one pack for large offloaded payloads,
and the general one)."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from nitro_netd.frames.checksum import fold, ones_complement_sum
from nitro_netd.frames.ethernet import MacAddress, parse_ethernet
from nitro_netd.frames.ipv4 import IpProto, parse_ipv4
from nitro_netd.frames.tcp import parse_tcp
from nitro_netd.netstack.output import SplitFrame
from nitro_netd.netstack.tcp.segments import SPLIT_MIN, SegmentBuilder

ENCLAVE_MAC = MacAddress.parse("5a:94:ef:e4:0c:ee")
GATEWAY_MAC = MacAddress.parse("5a:94:ef:e4:0c:dd")
WORLD = IPv4Address("198.18.0.2")
ENCLAVE = IPv4Address("192.168.127.2")


def builder(partial: bool, source: IPv4Address = WORLD) -> SegmentBuilder:
    return SegmentBuilder(partial, ENCLAVE_MAC, GATEWAY_MAC, source, ENCLAVE, 443, 40000)


def pseudo_header_sum(source: IPv4Address, tcp_length: int) -> int:
    return ones_complement_sum(source.packed + ENCLAVE.packed) + IpProto.TCP + tcp_length


@given(
    source=st.ip_addresses(v=4),
    seq=st.integers(0, 2**32 - 1),
    ack=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 0xFF),
    window=st.integers(0, 0xFFFF),
    length=st.sampled_from([SPLIT_MIN, SPLIT_MIN + 1, 9000, 64240, 65481]),
    skip=st.integers(0, 0x1FFFF),
)
def test_tcp_segments_offloaded_large_payload_frames_are_valid(
    source: IPv4Address, seq: int, ack: int, flags: int, window: int, length: int, skip: int
) -> None:
    build = builder(True, source)
    for _ in range(skip % 7):  # move the identification along, across its wrap too
        build.build(seq, ack, flags, window, bytes(SPLIT_MIN))
    build._ident = (build._ident + skip) & 0xFFFF
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    frame = build.build(seq, ack, flags, window, payload)
    assert isinstance(frame, SplitFrame)
    assert frame.payload is payload
    whole = bytes(frame)
    assert len(frame) == len(whole) == 54 + length
    ethernet, ip_body = parse_ethernet(whole)
    assert (ethernet.destination, ethernet.source) == (ENCLAVE_MAC, GATEWAY_MAC)
    ip, tcp_body = parse_ipv4(ip_body)  # checks the header checksum
    assert ones_complement_sum(whole[14:34]) == 0xFFFF
    assert (ip.source, ip.destination, ip.protocol, ip.total_length) == (
        source, ENCLAVE, IpProto.TCP, 40 + length,
    )  # fmt: skip
    tcp, data = parse_tcp(tcp_body, source=source, destination=ENCLAVE, verify_checksum=False)
    assert (tcp.source_port, tcp.destination_port, tcp.seq, tcp.ack) == (443, 40000, seq, ack)
    assert (int(tcp.flags), tcp.window, bytes(data)) == (flags, window, payload)
    assert int.from_bytes(whole[50:52], "big") == fold(pseudo_header_sum(source, 20 + length))


@given(length=st.integers(0, 9000), partial=st.booleans())
def test_tcp_segments_both_paths_agree_with_the_codecs(length: int, partial: bool) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(length))
    frame = builder(partial).build(1, 2, 0x18, 1000, payload)
    whole = bytes(frame)
    _, ip_body = parse_ipv4(parse_ethernet(whole)[1])
    if partial:
        assert int.from_bytes(whole[50:52], "big") == fold(pseudo_header_sum(WORLD, 20 + length))
    else:  # a complete checksum: the codec verifies it
        parse_tcp(ip_body, source=WORLD, destination=ENCLAVE, verify_checksum=True)
    segment = parse_tcp(ip_body, source=WORLD, destination=ENCLAVE, verify_checksum=not partial)
    assert bytes(segment[1]) == payload

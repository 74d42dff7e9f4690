"""The netstack's link layer: ARP, ping to its own addresses, and drop accounting."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames.arp import ArpOp
from nitro_netd.frames.errors import DropReason
from nitro_netd.frames.ethernet import EtherType, MacAddress, build_ethernet
from nitro_netd.frames.icmp import IcmpType
from nitro_netd.netstack import NetStack, StackConfig
from tests.support.fake_enclave import FakeEnclave

GATEWAY = IPv4Address("192.168.127.1")
HOST_ALIAS = IPv4Address("192.168.127.254")


def make() -> tuple[NetStack, FakeEnclave]:
    config = StackConfig()
    return NetStack(config), FakeEnclave(config)


def test_arp_request_for_gateway_is_answered_with_gateway_mac() -> None:
    stack, enclave = make()
    stack.receive_frame(enclave.arp_request(GATEWAY), now=1.0)
    [frame] = stack.frames_to_send()
    reply = enclave.parse_arp_reply(frame)
    assert reply.op == ArpOp.REPLY
    assert reply.sender_ip == GATEWAY
    assert reply.sender_mac == stack.config.gateway_mac
    assert reply.target_ip == enclave.ip
    assert len(frame) >= 60


def test_arp_request_for_host_alias_is_answered() -> None:
    stack, enclave = make()
    stack.receive_frame(enclave.arp_request(HOST_ALIAS), now=1.0)
    [frame] = stack.frames_to_send()
    assert enclave.parse_arp_reply(frame).sender_ip == HOST_ALIAS


def test_arp_for_other_address_is_dropped_and_counted() -> None:
    stack, enclave = make()
    stack.receive_frame(enclave.arp_request(IPv4Address("192.168.127.77")), now=1.0)
    assert stack.frames_to_send() == []
    assert stack.stats.drops[DropReason.NOT_FOR_US] == 1


def test_arp_teaches_the_enclave_mac_used_for_replies() -> None:
    stack, enclave = make()
    enclave.config = StackConfig(enclave_mac=MacAddress.parse("02:00:00:00:00:09"))
    stack.receive_frame(enclave.arp_request(GATEWAY), now=1.0)
    stack.frames_to_send()
    stack.receive_frame(enclave.ping(GATEWAY), now=1.0)
    [frame] = stack.frames_to_send()
    assert frame[:6] == MacAddress.parse("02:00:00:00:00:09").octets


def test_ping_to_gateway_gets_echo_reply_with_same_id_seq_and_data() -> None:
    stack, enclave = make()
    stack.receive_frame(enclave.ping(GATEWAY, identifier=99, sequence=5, data=b"x" * 56), now=1.0)
    [frame] = stack.frames_to_send()
    source, message = enclave.parse_icmp_reply(frame)
    assert source == GATEWAY
    assert (message.type, message.identifier, message.sequence) == (IcmpType.ECHO_REPLY, 99, 5)
    assert message.payload == b"x" * 56


def test_unhandled_ip_protocol_is_counted_as_unsupported() -> None:
    stack, enclave = make()
    stack.receive_frame(enclave.ipv4(IPv4Address("198.18.0.2"), 132, bytes(12)), now=1.0)
    assert stack.stats.drops[DropReason.UNSUPPORTED_PROTOCOL] == 1


def test_ipv6_frames_are_dropped_as_unsupported_ethertype() -> None:
    stack, enclave = make()
    frame = build_ethernet(stack.config.gateway_mac, enclave.mac, EtherType.IPV6, bytes(60))
    stack.receive_frame(frame, now=1.0)
    assert stack.stats.drops == {DropReason.UNSUPPORTED_ETHERTYPE: 1}


def test_frame_to_another_mac_is_not_for_us() -> None:
    stack, enclave = make()
    frame = enclave.ping(GATEWAY)
    frame = bytes(6) + frame[6:]
    stack.receive_frame(frame, now=1.0)
    assert stack.stats.drops == {DropReason.NOT_FOR_US: 1}


def test_spoofed_source_address_is_dropped() -> None:
    stack, _ = make()
    spoofer = FakeEnclave(StackConfig(enclave_ip=IPv4Address("192.168.127.9")))
    stack.receive_frame(spoofer.ping(GATEWAY), now=1.0)
    assert stack.stats.drops == {DropReason.BAD_SOURCE: 1}


def test_corrupted_ip_header_is_dropped_with_bad_checksum() -> None:
    stack, enclave = make()
    frame = bytearray(enclave.ping(GATEWAY))
    frame[14 + 8] ^= 0xFF  # TTL
    stack.receive_frame(frame, now=1.0)
    assert stack.stats.drops == {DropReason.BAD_CHECKSUM: 1}


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_frames_never_raise_and_are_all_accounted(data: bytes) -> None:
    stack, _ = make()
    stack.receive_frame(data, now=1.0)
    replies = stack.frames_to_send()
    assert stack.stats.frames_in == 1
    assert len(replies) + sum(stack.stats.drops.values()) >= 1


@settings(max_examples=300)
@given(st.binary(max_size=120), st.sampled_from([EtherType.ARP, EtherType.IPV4]))
def test_arbitrary_payloads_to_gateway_never_raise(payload: bytes, ethertype: EtherType) -> None:
    stack, enclave = make()
    frame = build_ethernet(stack.config.gateway_mac, enclave.mac, ethertype, payload)
    stack.receive_frame(frame, now=1.0)
    stack.frames_to_send()
    assert stack.stats.frames_in == 1

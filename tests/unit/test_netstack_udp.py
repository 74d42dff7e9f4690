"""UDP through the netstack: flows, NAT, idle expiry, limits, ICMP errors and drops."""

from __future__ import annotations

import errno
import logging
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames.errors import DropReason
from nitro_netd.frames.icmp import IcmpType, UnreachableCode
from nitro_netd.frames.ipv4 import IpProto, parse_ipv4
from nitro_netd.netstack import NetStack, StackConfig, UdpDatagram, UdpFailed, UdpSend
from tests.support.fake_datagram_host import FakeDatagramHost, datagram_rig
from tests.support.fake_enclave import FakeEnclave

WORLD = IPv4Address("198.18.0.2")
HOST_ALIAS = IPv4Address("192.168.127.254")
GATEWAY = IPv4Address("192.168.127.1")
LOOPBACK = IPv4Address("127.0.0.1")


def make(**config: object) -> tuple[NetStack, FakeEnclave, FakeDatagramHost]:
    return datagram_rig(StackConfig(**config))  # type: ignore[arg-type]


def send_one(stack: NetStack, host: FakeDatagramHost) -> UdpSend:
    [send] = host.run(stack)
    assert isinstance(send, UdpSend)
    return send


def test_udp_ipv4_enclave_to_world_opens_a_flow_with_the_datagram() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.udp(WORLD, 40000, 123, b"ntp?"), now=1.0)
    send = send_one(stack, host)
    assert (send.address, send.port, send.data) == (WORLD, 123, b"ntp?")
    assert stack.stats.drops == {}


def test_udp_ipv4_round_trip_reverses_the_flow() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.udp(WORLD, 40000, 7, b"hello"), now=1.0)
    assert host.echo(stack, now=1.1) == 1
    [frame] = stack.frames_to_send()
    source, udp, data = enclave.parse_udp_reply(frame)
    assert (source, udp.source_port, udp.destination_port, data) == (WORLD, 7, 40000, b"hello")


def test_udp_ipv4_host_alias_is_the_parent_loopback_both_ways() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.udp(HOST_ALIAS, 40001, 9000, b"x"), now=1.0)
    send = send_one(stack, host)
    assert (send.address, send.port) == (LOOPBACK, 9000)
    stack.handle_host_event(UdpDatagram(send.flow, LOOPBACK, 9000, b"y"), now=1.1)
    [frame] = stack.frames_to_send()
    source, udp, data = enclave.parse_udp_reply(frame)
    assert (source, udp.source_port, data) == (HOST_ALIAS, 9000, b"y")


def test_udp_ipv4_flow_per_five_tuple() -> None:
    stack, enclave, host = make()
    for sport, dport in [(40000, 53), (40000, 53), (40000, 54), (40001, 53)]:
        stack.receive_frame(enclave.udp(WORLD, sport, dport), now=1.0)
    flows = [send.flow for send in host.run(stack)]
    assert flows[0] == flows[1]
    assert len(set(flows)) == 3


def test_udp_ipv4_idle_flow_is_closed_after_timeout_and_reopened_fresh() -> None:
    stack, enclave, host = make(udp_idle_timeout=120.0)
    stack.receive_frame(enclave.udp(WORLD, 40000, 53), now=10.0)
    first = send_one(stack, host).flow
    assert stack.get_timer() == 130.0
    stack.handle_timer(now=129.9)
    assert host.run(stack) == []
    stack.handle_timer(now=130.0)
    assert host.run(stack) == []
    assert host.closed == [first]
    assert stack.get_timer() is None
    stack.receive_frame(enclave.udp(WORLD, 40000, 53), now=131.0)
    assert send_one(stack, host).flow != first


def test_udp_ipv4_replies_keep_a_flow_alive() -> None:
    stack, enclave, host = make(udp_idle_timeout=10.0)
    stack.receive_frame(enclave.udp(WORLD, 40000, 53), now=0.0)
    send = send_one(stack, host)
    stack.handle_host_event(UdpDatagram(send.flow, WORLD, 53, b"r"), now=8.0)
    assert stack.get_timer() == 18.0
    stack.handle_timer(now=12.0)
    assert host.closed == []


def test_udp_ipv4_flow_limit_drops_new_flows_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    stack, enclave, host = make(max_udp_flows=2)
    for port in (1, 2, 3, 4):
        stack.receive_frame(enclave.udp(WORLD, 40000, port), now=1.0)
    stack.receive_frame(enclave.udp(WORLD, 40000, 1), now=1.0)  # an existing flow still works
    assert [send.port for send in host.run(stack) if isinstance(send, UdpSend)] == [1, 2, 1]
    assert stack.stats.drops == {DropReason.LIMIT: 2}
    assert caplog.text.count("flow limit 2 reached") == 1


def test_udp_ipv4_connection_refused_becomes_icmp_port_unreachable() -> None:
    stack, enclave, host = make()
    datagram = enclave.udp(HOST_ALIAS, 40000, 9, b"anyone?")
    stack.receive_frame(datagram, now=1.0)
    send = send_one(stack, host)
    stack.handle_host_event(UdpFailed(send.flow, errno.ECONNREFUSED), now=1.1)
    [frame] = stack.frames_to_send()
    source, message = enclave.parse_icmp_reply(frame)
    assert source == HOST_ALIAS
    assert (message.type, message.code) == (IcmpType.DEST_UNREACHABLE, UnreachableCode.PORT)
    original = datagram[14:]
    assert message.payload == original[:28]  # RFC 792: the IP header + 8 bytes, as sent
    quoted, _ = parse_ipv4(message.payload + bytes(len(original) - 28))
    assert (quoted.source, quoted.destination, quoted.protocol) == (
        enclave.ip,
        HOST_ALIAS,
        IpProto.UDP,
    )


def test_udp_ipv4_unmapped_host_error_sends_nothing() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.udp(WORLD, 40000, 9), now=1.0)
    send = send_one(stack, host)
    stack.handle_host_event(UdpFailed(send.flow, errno.EMSGSIZE), now=1.1)
    assert stack.frames_to_send() == []
    assert send.flow in host.udp_sockets  # the flow survives a host error


def test_udp_ipv4_large_datagrams_up_to_the_mtu_both_ways() -> None:
    stack, enclave, host = make(mtu=1500)
    payload = bytes(range(256)) * 5 + b"z" * (1472 - 1280)
    stack.receive_frame(enclave.udp(WORLD, 40000, 7, payload), now=1.0)
    assert host.echo(stack, now=1.0) == 1
    [frame] = stack.frames_to_send()
    assert enclave.parse_udp_reply(frame)[2] == payload
    assert len(frame) == 14 + 1500


def test_udp_ipv4_host_datagram_larger_than_mtu_is_dropped_and_counted() -> None:
    stack, enclave, host = make(mtu=1500)
    stack.receive_frame(enclave.udp(WORLD, 40000, 7), now=1.0)
    send = send_one(stack, host)
    stack.handle_host_event(UdpDatagram(send.flow, WORLD, 7, bytes(1473)), now=1.0)
    assert stack.frames_to_send() == []
    assert stack.stats.drops == {DropReason.LIMIT: 1}


@pytest.mark.parametrize(
    "destination",
    ["192.168.127.2", "192.168.127.77", "192.168.127.255", "255.255.255.255", "224.0.0.251"],
)
def test_udp_ipv4_to_link_broadcast_or_multicast_is_not_forwarded(destination: str) -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.udp(IPv4Address(destination), 5353, 5353), now=1.0)
    assert host.run(stack) == []
    assert stack.stats.drops == {DropReason.NOT_FOR_US: 1}


def test_udp_ipv4_to_gateway_closed_port_gets_port_unreachable() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.udp(GATEWAY, 40000, 123), now=1.0)
    [frame] = stack.frames_to_send()
    source, message = enclave.parse_icmp_reply(frame)
    assert (source, message.type, message.code) == (GATEWAY, IcmpType.DEST_UNREACHABLE, 3)
    assert host.run(stack) == []
    assert stack.stats.drops == {DropReason.NOT_FOR_US: 1}


def test_udp_ipv4_port_zero_and_bad_checksum_are_dropped() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.udp(WORLD, 0, 53), now=1.0)
    corrupt = bytearray(enclave.udp(WORLD, 40000, 53, b"abcd"))
    corrupt[-1] ^= 0xFF
    stack.receive_frame(corrupt, now=1.0)
    assert host.run(stack) == []
    assert stack.stats.drops == {DropReason.BAD_HEADER: 1, DropReason.BAD_CHECKSUM: 1}


def test_udp_ipv4_link_reset_closes_every_flow() -> None:
    stack, enclave, host = make()
    for port in (1, 2, 3):
        stack.receive_frame(enclave.udp(WORLD, 40000, port), now=1.0)
    host.run(stack)
    stack.handle_link_reset()
    host.run(stack)
    assert host.udp_sockets == {}
    assert len(host.closed) == 3
    assert stack.get_timer() is None


def test_udp_ipv4_events_for_closed_flows_are_ignored() -> None:
    stack, _, _ = make()
    stack.handle_host_event(UdpDatagram(999, WORLD, 53, b"late"), now=1.0)
    stack.handle_host_event(UdpFailed(999, errno.ECONNREFUSED), now=1.0)
    assert stack.frames_to_send() == []
    assert stack.commands_to_send() == []


def test_udp_ipv4_expiry_closes_only_the_idle_flows() -> None:
    stack, enclave, host = make(udp_idle_timeout=5.0)
    stack.receive_frame(enclave.udp(WORLD, 40000, 1), now=0.0)
    stack.receive_frame(enclave.udp(WORLD, 40000, 2), now=3.0)
    stack.receive_frame(enclave.udp(WORLD, 40000, 1), now=4.0)
    first, second, _ = host.run(stack)
    stack.handle_timer(now=8.0)
    host.run(stack)
    assert host.closed == [second.flow]
    assert stack.get_timer() == 9.0
    assert first.flow in host.udp_sockets


@settings(max_examples=300)
@given(st.binary(max_size=80), st.integers(0, 2))
def test_udp_ipv4_arbitrary_payloads_never_raise(payload: bytes, where: int) -> None:
    stack, enclave, host = make()
    destination = [WORLD, GATEWAY, HOST_ALIAS][where]
    stack.receive_frame(enclave.ipv4(destination, IpProto.UDP, payload), now=1.0)
    stack.frames_to_send()
    host.run(stack)
    assert stack.stats.frames_in == 1

"""Ping forwarding through the netstack: flows, identifiers, expiry and host failures."""

from __future__ import annotations

import errno
from ipaddress import IPv4Address

from nitro_netd.frames.errors import DropReason
from nitro_netd.frames.icmp import IcmpMessage, IcmpType, UnreachableCode, build_icmp
from nitro_netd.frames.ipv4 import IpProto, parse_ipv4
from nitro_netd.netstack import NetStack, PingFailed, PingReply, PingSend, StackConfig
from tests.support.fake_datagram_host import FakeDatagramHost, datagram_rig
from tests.support.fake_enclave import FakeEnclave

WORLD = IPv4Address("198.18.0.2")
OTHER = IPv4Address("198.18.0.3")
HOST_ALIAS = IPv4Address("192.168.127.254")
GATEWAY = IPv4Address("192.168.127.1")
LOOPBACK = IPv4Address("127.0.0.1")


def make(**config: object) -> tuple[NetStack, FakeEnclave, FakeDatagramHost]:
    return datagram_rig(StackConfig(**config))  # type: ignore[arg-type]


def ping_one(stack: NetStack, host: FakeDatagramHost) -> PingSend:
    [send] = host.run(stack)
    assert isinstance(send, PingSend)
    return send


def test_ping_ipv4_enclave_to_world_round_trip_keeps_the_enclave_identifier() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.ping(WORLD, identifier=0xBEEF, sequence=3, data=b"abc"), now=1.0)
    send = ping_one(stack, host)
    assert (send.address, send.sequence, send.payload) == (WORLD, 3, b"abc")
    stack.handle_host_event(PingReply(send.flow, 3, b"abc"), now=1.01)
    [frame] = stack.frames_to_send()
    source, message = enclave.parse_icmp_reply(frame)
    assert source == WORLD
    assert (message.type, message.identifier, message.sequence) == (IcmpType.ECHO_REPLY, 0xBEEF, 3)
    assert message.payload == b"abc"


def test_ping_ipv4_host_alias_goes_to_parent_loopback() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.ping(HOST_ALIAS), now=1.0)
    send = ping_one(stack, host)
    assert send.address == LOOPBACK
    stack.handle_host_event(PingReply(send.flow, send.sequence, send.payload), now=1.0)
    source, _ = enclave.parse_icmp_reply(stack.frames_to_send()[0])
    assert source == HOST_ALIAS


def test_ping_ipv4_gateway_is_still_answered_locally() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.ping(GATEWAY), now=1.0)
    assert host.run(stack) == []
    assert enclave.parse_icmp_reply(stack.frames_to_send()[0])[0] == GATEWAY


def test_ping_ipv4_flow_per_identifier_and_destination() -> None:
    stack, enclave, host = make()
    for ident, destination, seq in [(1, WORLD, 1), (1, WORLD, 2), (2, WORLD, 1), (1, OTHER, 1)]:
        stack.receive_frame(enclave.ping(destination, identifier=ident, sequence=seq), now=1.0)
    flows = [send.flow for send in host.run(stack)]
    assert flows[0] == flows[1]
    assert len(set(flows)) == 3


def test_ping_ipv4_idle_flow_is_closed() -> None:
    stack, enclave, host = make(ping_idle_timeout=30.0)
    stack.receive_frame(enclave.ping(WORLD), now=5.0)
    send = ping_one(stack, host)
    assert stack.get_timer() == 35.0
    stack.handle_timer(now=35.0)
    host.run(stack)
    assert host.closed == [send.flow]
    assert host.ping_sockets == {}


def test_ping_ipv4_not_permitted_drops_world_pings_and_counts_them() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.ping(WORLD), now=1.0)
    world = ping_one(stack, host)
    stack.handle_host_event(PingFailed(world.flow, errno.EACCES), now=1.0)
    assert stack.frames_to_send() == []
    assert stack.stats.drops == {DropReason.NOT_IMPLEMENTED: 1}
    host.run(stack)
    assert host.ping_sockets == {}
    assert stack.get_timer() is None
    stack.receive_frame(enclave.ping(WORLD), now=2.0)
    assert ping_one(stack, host).address == WORLD  # tried again: the sysctl may have changed


def test_ping_ipv4_not_permitted_alias_pings_are_answered_locally() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.ping(HOST_ALIAS, sequence=1), now=1.0)
    alias = ping_one(stack, host)
    stack.handle_host_event(PingFailed(alias.flow, errno.EACCES), now=1.0)
    source, message = enclave.parse_icmp_reply(stack.frames_to_send()[0])
    assert (source, message.type, message.sequence) == (HOST_ALIAS, IcmpType.ECHO_REPLY, 1)
    stack.receive_frame(enclave.ping(HOST_ALIAS, sequence=2), now=2.0)
    assert host.run(stack) == []  # from now on the alias is answered here
    assert enclave.parse_icmp_reply(stack.frames_to_send()[0])[1].sequence == 2
    assert stack.stats.drops == {}


def test_ping_ipv4_host_unreachable_becomes_icmp_unreachable() -> None:
    stack, enclave, host = make()
    request = enclave.ping(WORLD, identifier=9)
    stack.receive_frame(request, now=1.0)
    send = ping_one(stack, host)
    stack.handle_host_event(PingFailed(send.flow, errno.EHOSTUNREACH), now=1.0)
    source, message = enclave.parse_icmp_reply(stack.frames_to_send()[0])
    assert (source, message.type, message.code) == (WORLD, 3, UnreachableCode.HOST)
    assert message.payload == request[14 : 14 + 28]
    quoted, _ = parse_ipv4(message.payload + bytes(4))  # the quote stops after 8 bytes
    assert quoted.destination == WORLD


def test_ping_ipv4_shares_the_flow_budget_with_udp() -> None:
    stack, enclave, host = make(max_udp_flows=1)
    stack.receive_frame(enclave.udp(WORLD, 40000, 53), now=1.0)
    stack.receive_frame(enclave.ping(WORLD), now=1.0)
    assert len(host.run(stack)) == 1
    assert stack.stats.drops == {DropReason.LIMIT: 1}


def test_ping_ipv4_reply_larger_than_mtu_is_dropped_and_counted() -> None:
    stack, enclave, host = make(mtu=1500)
    stack.receive_frame(enclave.ping(WORLD), now=1.0)
    send = ping_one(stack, host)
    stack.handle_host_event(PingReply(send.flow, 1, bytes(1473)), now=1.0)
    assert stack.frames_to_send() == []
    assert stack.stats.drops == {DropReason.LIMIT: 1}


def test_ping_ipv4_link_reset_closes_every_ping_socket() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.ping(WORLD), now=1.0)
    stack.receive_frame(enclave.ping(OTHER), now=1.0)
    host.run(stack)
    stack.handle_link_reset()
    host.run(stack)
    assert host.ping_sockets == {}
    assert stack.get_timer() is None


def test_ping_ipv4_other_icmp_types_and_link_addresses_are_dropped() -> None:
    stack, enclave, host = make()
    stack.receive_frame(enclave.ping(IPv4Address("192.168.127.255")), now=1.0)
    stack.receive_frame(enclave.ping(IPv4Address("224.0.0.1")), now=1.0)
    reply = enclave.ipv4(
        WORLD, IpProto.ICMP, build_icmp(IcmpMessage(IcmpType.ECHO_REPLY, 0, 1, 1, b""))
    )
    stack.receive_frame(reply, now=1.0)
    assert host.run(stack) == []
    assert stack.stats.drops == {DropReason.NOT_FOR_US: 2, DropReason.UNSUPPORTED_ICMP: 1}

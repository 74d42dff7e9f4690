"""The gateway's DNS server: local host names, raw forwarding, failover and SERVFAIL."""

from __future__ import annotations

import errno
from ipaddress import IPv4Address

import pytest

from nitro_netd.frames.errors import DropReason
from nitro_netd.netstack import NetStack, StackConfig, UdpDatagram, UdpFailed, UdpSend
from nitro_netd.netstack.dns import (
    DnsQuestion,
    RCode,
    RRType,
    build_query,
    parse_header,
    parse_query,
)
from tests.support.fake_datagram_host import FakeDatagramHost, datagram_rig
from tests.support.fake_enclave import FakeEnclave

GATEWAY = IPv4Address("192.168.127.1")
RESOLVERS = (IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3"))


def make(
    servers: tuple[IPv4Address, ...] = RESOLVERS, **config: object
) -> tuple[NetStack, FakeEnclave, FakeDatagramHost]:
    return datagram_rig(StackConfig(dns_servers=servers, dns_timeout=2.0, **config))  # type: ignore[arg-type]


def query(name: str, qtype: int = RRType.A, ident: int = 0x4242) -> bytes:
    labels = tuple(label.encode() for label in name.split("."))
    return build_query(ident, DnsQuestion(labels, qtype, 1))


def answer_to_enclave(stack: NetStack, enclave: FakeEnclave, port: int = 33333) -> bytes:
    [frame] = stack.frames_to_send()
    source, udp, data = enclave.parse_udp_reply(frame)
    assert (source, udp.source_port, udp.destination_port) == (GATEWAY, 53, port)
    return data


def ask(stack: NetStack, enclave: FakeEnclave, message: bytes, now: float = 1.0) -> None:
    stack.receive_frame(enclave.udp(GATEWAY, 33333, 53, message), now=now)


@pytest.mark.parametrize("name", ["host.docker.internal", "Host.Containers.Internal"])
def test_dns_host_names_are_answered_locally_with_the_alias(name: str) -> None:
    stack, enclave, host = make()
    ask(stack, enclave, query(name))
    answer = answer_to_enclave(stack, enclave)
    assert host.run(stack) == []
    header = parse_header(answer)
    assert (header.id, header.rcode, header.ancount) == (0x4242, RCode.NOERROR, 1)
    assert answer.endswith(IPv4Address("192.168.127.254").packed)


def test_dns_host_name_aaaa_is_noerror_without_answers() -> None:
    stack, enclave, _ = make()
    ask(stack, enclave, query("host.docker.internal", RRType.AAAA))
    header = parse_header(answer_to_enclave(stack, enclave))
    assert (header.rcode, header.ancount) == (RCode.NOERROR, 0)


def test_dns_other_names_are_forwarded_raw_and_answers_relayed_unchanged() -> None:
    stack, enclave, host = make(dns_port=5353)
    message = query("example.com", RRType.AAAA) + b"\x00\x00\x29\x04\xd0" + bytes(6)  # EDNS OPT
    ask(stack, enclave, message)
    [send] = host.run(stack)
    assert isinstance(send, UdpSend)
    assert (send.address, send.port, send.data) == (RESOLVERS[0], 5353, message)
    upstream = message[:2] + b"\x81\x80" + message[4:] + b"any answer bytes"
    stack.handle_host_event(UdpDatagram(send.flow, RESOLVERS[0], 5353, upstream), now=1.5)
    assert answer_to_enclave(stack, enclave) == upstream
    host.run(stack)
    assert host.closed == [send.flow]
    assert stack.get_timer() is None


def test_dns_answer_with_another_id_is_ignored() -> None:
    stack, enclave, host = make()
    ask(stack, enclave, query("example.com"))
    [send] = host.run(stack)
    stack.handle_host_event(UdpDatagram(send.flow, RESOLVERS[0], 53, b"\x99\x99rest"), now=1.1)
    assert stack.frames_to_send() == []
    assert send.flow in host.udp_sockets


def test_dns_timeout_tries_the_next_resolver_then_servfails() -> None:
    stack, enclave, host = make()
    ask(stack, enclave, query("example.com"), now=10.0)
    [first] = host.run(stack)
    assert stack.get_timer() == 12.0
    stack.handle_timer(now=12.0)
    [second] = host.run(stack)
    assert isinstance(second, UdpSend)
    assert second.address == RESOLVERS[1]
    assert second.flow != first.flow
    assert stack.frames_to_send() == []
    stack.handle_timer(now=14.0)
    answer = parse_query(answer_to_enclave(stack, enclave))
    assert (answer.header.id, answer.header.rcode) == (0x4242, RCode.SERVFAIL)
    assert answer.question.name == "example.com"
    host.run(stack)
    assert host.udp_sockets == {}


def test_dns_refused_resolver_fails_over_at_once() -> None:
    stack, enclave, host = make()
    ask(stack, enclave, query("example.com"))
    [first] = host.run(stack)
    stack.handle_host_event(UdpFailed(first.flow, errno.ECONNREFUSED), now=1.0)
    [second] = host.run(stack)
    assert isinstance(second, UdpSend)
    assert second.address == RESOLVERS[1]
    stack.handle_host_event(UdpFailed(second.flow, errno.ECONNREFUSED), now=1.0)
    assert parse_header(answer_to_enclave(stack, enclave)).rcode == RCode.SERVFAIL


def test_dns_without_resolvers_answers_servfail_never_nxdomain() -> None:
    stack, enclave, host = make(servers=())
    ask(stack, enclave, query("example.com"))
    assert parse_header(answer_to_enclave(stack, enclave)).rcode == RCode.SERVFAIL
    assert host.run(stack) == []


def test_dns_queries_give_their_flow_back_to_the_budget() -> None:
    stack, enclave, host = make(max_udp_flows=1)
    for ident in (1, 2, 3):
        ask(stack, enclave, query("example.com", ident=ident))
        [send] = host.run(stack)
        assert isinstance(send, UdpSend)
        reply = UdpDatagram(send.flow, RESOLVERS[0], 53, send.data[:2] + b"\x81\x80")
        stack.handle_host_event(reply, now=1.0)
    assert len(stack.frames_to_send()) == 3
    assert stack.stats.drops == {}


def test_dns_budget_exhausted_drops_the_query() -> None:
    stack, enclave, host = make(max_udp_flows=1)
    ask(stack, enclave, query("example.com", ident=1))
    ask(stack, enclave, query("example.com", ident=2))
    assert len(host.run(stack)) == 1
    assert stack.stats.drops == {DropReason.LIMIT: 1}


def test_dns_malformed_query_or_response_is_dropped_and_counted() -> None:
    stack, enclave, host = make()
    ask(stack, enclave, b"\x00\x01short")
    ask(stack, enclave, query("example.com")[:2] + b"\x81\x80" + query("example.com")[4:])
    assert host.run(stack) == []
    assert stack.frames_to_send() == []
    assert stack.stats.drops == {DropReason.TRUNCATED: 1, DropReason.BAD_HEADER: 1}


def test_dns_link_reset_abandons_pending_queries() -> None:
    stack, enclave, host = make()
    ask(stack, enclave, query("example.com"))
    host.run(stack)
    stack.handle_link_reset()
    host.run(stack)
    assert host.udp_sockets == {}
    assert stack.get_timer() is None

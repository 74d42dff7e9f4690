"""UDP and DNS through the in-process daemon to real loopback sockets, with a fake agent."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from nitro_netd.frames.ethernet import EtherType, parse_ethernet
from nitro_netd.frames.icmp import IcmpType, UnreachableCode
from nitro_netd.frames.ipv4 import IpProto, parse_ipv4
from nitro_netd.netstack import StackConfig
from nitro_netd.netstack.dns import DnsQuestion, RCode, RRType, build_query, parse_header
from tests.support.fake_enclave import FakeEnclave
from tests.support.link_agent import LinkAgent, LogWaiter, running_daemon

HOST_ALIAS = IPv4Address("192.168.127.254")
GATEWAY = IPv4Address("192.168.127.1")
LOOPBACK = IPv4Address("127.0.0.1")
DEADLINE = 10.0

Reply = Callable[[bytes], bytes | None]


class UdpServer(asyncio.DatagramProtocol):
    """A loopback UDP server that records what it gets and answers with `reply(data)`."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        assert isinstance(addr[0], str)
        self.received.append((data, (addr[0], addr[1])))
        answer = self.reply(data)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)

    @property
    def port(self) -> int:
        assert self.transport is not None
        port: int = self.transport.get_extra_info("sockname")[1]
        return port


async def start_server(reply: Reply) -> UdpServer:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: UdpServer(reply), local_addr=("127.0.0.1", 0)
    )
    server.transport = transport  # connection_made() runs only on the next loop turn
    return server


@pytest.fixture
async def echo_server() -> AsyncIterator[UdpServer]:
    server = await start_server(lambda data: data)
    yield server
    assert server.transport is not None
    server.transport.close()


def closed_udp_port() -> int:
    """A loopback port with (almost certainly) no socket bound: bind one, then close it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def is_udp_to_enclave(frame: bytes) -> bool:
    header, payload = parse_ethernet(frame)
    return header.ethertype == EtherType.IPV4 and parse_ipv4(payload)[0].protocol == IpProto.UDP


def is_icmp_to_enclave(frame: bytes) -> bool:
    header, payload = parse_ethernet(frame)
    return header.ethertype == EtherType.IPV4 and parse_ipv4(payload)[0].protocol == IpProto.ICMP


async def udp_exchange(agent: LinkAgent, frame: bytes) -> tuple[IPv4Address, int, int, bytes]:
    """Send a UDP frame; return (source, source port, destination port, data) of the reply."""
    enclave = FakeEnclave()
    agent.send(frame)
    source, udp, data = enclave.parse_udp_reply(await agent.receive_matching(is_udp_to_enclave))
    return source, udp.source_port, udp.destination_port, data


async def test_udp_ipv4_enclave_to_host_echo_via_host_alias(
    tmp_path: Path, echo_server: UdpServer
) -> None:
    path, enclave = tmp_path / "link.sock", FakeEnclave()
    async with running_daemon(path, StackConfig(dns_servers=(LOOPBACK,))):
        agent = await LinkAgent.connect(path)
        frame = enclave.udp(HOST_ALIAS, 40000, echo_server.port, b"hello parent")
        reply = await udp_exchange(agent, frame)
        assert reply == (HOST_ALIAS, echo_server.port, 40000, b"hello parent")
        [(data, peer)] = echo_server.received
        assert (data, peer[0]) == (b"hello parent", "127.0.0.1")
        agent.close()


async def test_udp_ipv4_many_flows_at_once(tmp_path: Path, echo_server: UdpServer) -> None:
    path, enclave = tmp_path / "link.sock", FakeEnclave()
    ports = range(41000, 41100)
    async with running_daemon(path, StackConfig(dns_servers=(LOOPBACK,))):
        agent = await LinkAgent.connect(path)
        for port in ports:
            agent.send(enclave.udp(HOST_ALIAS, port, echo_server.port, f"flow {port}".encode()))
        replies = set()
        for _ in ports:
            frame = await agent.receive_matching(is_udp_to_enclave)
            _, udp, data = enclave.parse_udp_reply(frame)
            replies.add((udp.destination_port, data))
        assert replies == {(port, f"flow {port}".encode()) for port in ports}
        assert len({peer for _, peer in echo_server.received}) == len(ports)  # a socket each
        agent.close()


async def test_udp_ipv4_large_datagram_at_the_mtu(tmp_path: Path, echo_server: UdpServer) -> None:
    path, enclave = tmp_path / "link.sock", FakeEnclave()
    config = StackConfig(dns_servers=(LOOPBACK,))
    payload = bytes(range(256)) * ((config.mtu - 28) // 256) + b"!" * ((config.mtu - 28) % 256)
    assert len(payload) + 28 == config.mtu
    async with running_daemon(path, config):
        agent = await LinkAgent.connect(path)
        reply = await udp_exchange(agent, enclave.udp(HOST_ALIAS, 40000, echo_server.port, payload))
        assert reply[3] == payload
        agent.close()


async def test_udp_ipv4_idle_flow_expires_and_next_datagram_gets_a_new_socket(
    tmp_path: Path, echo_server: UdpServer
) -> None:
    path, enclave = tmp_path / "link.sock", FakeEnclave()
    config = StackConfig(dns_servers=(LOOPBACK,), udp_idle_timeout=0.2)
    flow = f"[udp 192.168.127.2:40000→192.168.127.254:{echo_server.port}]"
    udp_logger = logging.getLogger("nitro_netd.netstack.udp")
    async with running_daemon(path, config):
        agent = await LinkAgent.connect(path)
        with LogWaiter(f"{flow} idle: closed").attached(udp_logger) as closed:
            await udp_exchange(agent, enclave.udp(HOST_ALIAS, 40000, echo_server.port, b"one"))
            await asyncio.wait_for(closed.seen.wait(), DEADLINE)
        await udp_exchange(agent, enclave.udp(HOST_ALIAS, 40000, echo_server.port, b"two"))
        first_peer, second_peer = (peer for _, peer in echo_server.received)
        assert first_peer != second_peer
        agent.close()


async def test_udp_ipv4_closed_port_gets_icmp_port_unreachable(tmp_path: Path) -> None:
    path, enclave = tmp_path / "link.sock", FakeEnclave()
    port = closed_udp_port()
    async with running_daemon(path, StackConfig(dns_servers=(LOOPBACK,))):
        agent = await LinkAgent.connect(path)
        sent = enclave.udp(HOST_ALIAS, 40000, port, b"anyone there?")
        agent.send(sent)
        frame = await agent.receive_matching(is_icmp_to_enclave)
        source, message = enclave.parse_icmp_reply(frame)
        assert (source, message.type, message.code) == (
            HOST_ALIAS,
            IcmpType.DEST_UNREACHABLE,
            UnreachableCode.PORT,
        )
        assert message.payload == sent[14 : 14 + 28]
        agent.close()


# --- DNS ------------------------------------------------------------------------------


def dns_query(name: str, qtype: int, ident: int = 0x5151) -> bytes:
    labels = tuple(label.encode() for label in name.split("."))
    return build_query(ident, DnsQuestion(labels, qtype, 1))


def aaaa_answer(query: bytes) -> bytes:
    """What a resolver would say: one AAAA record (2001:db8::1) for the question."""
    head = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
    record = b"\xc0\x0c" + struct.pack("!HHIH", RRType.AAAA, 1, 300, 16)
    return head + query[12:] + record + bytes.fromhex("20010db8000000000000000000000001")


async def test_dns_forwarded_raw_to_the_parent_resolver(tmp_path: Path) -> None:
    resolver = await start_server(aaaa_answer)
    path, enclave = tmp_path / "link.sock", FakeEnclave()
    config = StackConfig(dns_servers=(LOOPBACK,), dns_port=resolver.port)
    query = dns_query("www.example.test", RRType.AAAA)
    async with running_daemon(path, config):
        agent = await LinkAgent.connect(path)
        reply = await udp_exchange(agent, enclave.udp(GATEWAY, 33333, 53, query))
        assert reply == (GATEWAY, 53, 33333, aaaa_answer(query))
        assert [data for data, _ in resolver.received] == [query]
        agent.close()
    assert resolver.transport is not None
    resolver.transport.close()


@pytest.mark.parametrize("upstream", ["refusing", "silent"])
async def test_dns_dead_upstream_gets_servfail(tmp_path: Path, upstream: str) -> None:
    silent = await start_server(lambda data: None)
    port = closed_udp_port() if upstream == "refusing" else silent.port
    path, enclave = tmp_path / "link.sock", FakeEnclave()
    config = StackConfig(dns_servers=(LOOPBACK,), dns_port=port, dns_timeout=0.2)
    async with running_daemon(path, config):
        agent = await LinkAgent.connect(path)
        query = dns_query("www.example.test", RRType.A)
        reply = await udp_exchange(agent, enclave.udp(GATEWAY, 33333, 53, query))
        header = parse_header(reply[3])
        assert (header.id, header.rcode) == (0x5151, RCode.SERVFAIL)
        assert reply[3][12:] == query[12:]
        agent.close()
    assert silent.transport is not None
    silent.transport.close()


async def test_dns_host_docker_internal_is_answered_by_the_gateway(tmp_path: Path) -> None:
    resolver = await start_server(aaaa_answer)
    path, enclave = tmp_path / "link.sock", FakeEnclave()
    config = StackConfig(dns_servers=(LOOPBACK,), dns_port=resolver.port)
    async with running_daemon(path, config):
        agent = await LinkAgent.connect(path)
        query = dns_query("host.docker.internal", RRType.A)
        reply = await udp_exchange(agent, enclave.udp(GATEWAY, 33333, 53, query))
        assert parse_header(reply[3]).ancount == 1
        assert reply[3].endswith(HOST_ALIAS.packed)
        assert resolver.received == []
        agent.close()
    assert resolver.transport is not None
    resolver.transport.close()

"""The UDP and ping host sides on their own: commands in, events out, real loopback sockets."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import AsyncIterator
from ipaddress import IPv4Address

import pytest

from nitro_netd.netstack import (
    HostEvent,
    PingClose,
    PingFailed,
    PingReply,
    PingSend,
    UdpClose,
    UdpDatagram,
    UdpFailed,
    UdpSend,
)
from nitro_netd.parent.host_ping import HostPing
from nitro_netd.parent.host_udp import HostUdp

LOOPBACK = IPv4Address("127.0.0.1")
DEADLINE = 10.0


class Events:
    """Collects posted events and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.items: list[HostEvent] = []
        self.changed = asyncio.Event()

    def post(self, event: HostEvent) -> None:
        self.items.append(event)
        self.changed.set()

    async def next(self) -> HostEvent:
        async with asyncio.timeout(DEADLINE):
            while not self.items:
                self.changed.clear()
                await self.changed.wait()
        return self.items.pop(0)


@pytest.fixture
async def echo_socket() -> AsyncIterator[socket.socket]:
    """A loopback UDP socket that echoes every datagram from the loop."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)

    def echo() -> None:
        data, peer = sock.recvfrom(65536)
        sock.sendto(data, peer)

    loop.add_reader(sock.fileno(), echo)
    yield sock
    loop.remove_reader(sock.fileno())
    sock.close()


async def test_host_udp_send_and_receive_then_close(echo_socket: socket.socket) -> None:
    events = Events()
    side = HostUdp(asyncio.get_running_loop(), events.post)
    port = echo_socket.getsockname()[1]
    side.execute(UdpSend(7, LOOPBACK, port, b"ping"))
    assert await events.next() == UdpDatagram(7, LOOPBACK, port, b"ping")
    side.execute(UdpClose(7))
    assert side.sockets == {}
    side.execute(UdpClose(7))  # closing twice is harmless


async def test_host_udp_closed_port_reports_connection_refused() -> None:
    events = Events()
    side = HostUdp(asyncio.get_running_loop(), events.post)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    side.execute(UdpSend(3, LOOPBACK, port, b"x"))
    assert await events.next() == UdpFailed(3, errno.ECONNREFUSED)
    side.close_all()
    assert side.sockets == {}


async def test_host_udp_link_pause_holds_datagrams_until_resumed(
    echo_socket: socket.socket,
) -> None:
    events = Events()
    side = HostUdp(asyncio.get_running_loop(), events.post)
    port = echo_socket.getsockname()[1]
    side.execute(UdpSend(1, LOOPBACK, port, b"first"))
    assert await events.next() == UdpDatagram(1, LOOPBACK, port, b"first")
    side.set_link_paused(True)
    side.execute(UdpSend(1, LOOPBACK, port, b"second"))
    sock = side.sockets[1]
    async with asyncio.timeout(DEADLINE):  # the echo is in our socket's buffer...
        while not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
            await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)
    assert events.items == []  # ...but not read while paused
    side.set_link_paused(False)
    assert await events.next() == UdpDatagram(1, LOOPBACK, port, b"second")
    side.close_all()


def ping_sockets_allowed() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
    except OSError:
        return False
    return True


async def test_host_ping_loopback_reply_or_one_clear_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    events = Events()
    side = HostPing(asyncio.get_running_loop(), events.post)
    side.execute(PingSend(1, LOOPBACK, 5, b"abc"))
    side.execute(PingSend(2, LOOPBACK, 6, b"def"))
    if ping_sockets_allowed():
        replies = {await events.next(), await events.next()}
        assert replies == {PingReply(1, 5, b"abc"), PingReply(2, 6, b"def")}
        assert "ping_group_range" not in caplog.text
    else:
        assert [await events.next(), await events.next()] == [
            PingFailed(1, errno.EACCES),
            PingFailed(2, errno.EACCES),
        ]
        assert caplog.text.count("net.ipv4.ping_group_range='0 2147483647'") == 1
    side.execute(PingClose(1))
    side.close_all()
    assert side.sockets == {}

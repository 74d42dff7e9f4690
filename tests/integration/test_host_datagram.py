"""The UDP and ping host sides on their own: commands in, events out, real loopback sockets."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from typing import Any

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


class EchoSocket:
    """A loopback UDP socket that echoes every datagram from the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.echoed = asyncio.Event()
        loop.add_reader(self.sock.fileno(), self._echo)

    def _echo(self) -> None:
        data, peer = self.sock.recvfrom(65536)
        self.sock.sendto(data, peer)  # on loopback, in the peer's buffer when this returns
        self.echoed.set()

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


@pytest.fixture
async def echo() -> AsyncIterator[EchoSocket]:
    server = EchoSocket(asyncio.get_running_loop())
    yield server
    server.close()


async def test_host_udp_send_and_receive_then_close(echo: EchoSocket) -> None:
    events = Events()
    side = HostUdp(asyncio.get_running_loop(), events.post)
    port = echo.port
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


async def test_host_udp_link_pause_holds_datagrams_until_resumed(echo: EchoSocket) -> None:
    events = Events()
    side = HostUdp(asyncio.get_running_loop(), events.post)
    side.execute(UdpSend(1, LOOPBACK, echo.port, b"first"))
    assert await events.next() == UdpDatagram(1, LOOPBACK, echo.port, b"first")
    side.set_link_paused(True)
    echo.echoed.clear()
    side.execute(UdpSend(1, LOOPBACK, echo.port, b"second"))
    await asyncio.wait_for(echo.echoed.wait(), DEADLINE)  # the echo is in our buffer...
    for _ in range(10):
        await asyncio.sleep(0)
    assert events.items == []  # ...but not read while the link is paused
    side.set_link_paused(False)
    assert await events.next() == UdpDatagram(1, LOOPBACK, echo.port, b"second")
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


async def test_a_datagram_dropped_on_a_full_send_buffer_is_counted() -> None:
    from nitro_netd.frames.errors import DropReason
    from nitro_netd.netstack.events import UdpSend
    from nitro_netd.netstack.stats import StackStats
    from nitro_netd.parent.host_udp import HostUdp

    class FullSocket(socket.socket):
        def send(self, data: Any, flags: int = 0) -> int:
            raise BlockingIOError(11, "Resource temporarily unavailable")

    stats = StackStats()
    side = HostUdp(asyncio.get_running_loop(), lambda event: None, stats.count_drop)
    full = FullSocket(socket.AF_INET, socket.SOCK_DGRAM)
    side.add(5, full)
    side.execute(UdpSend(5, IPv4Address("127.0.0.1"), 9, b"x"))
    assert stats.drops[DropReason.HOST_SEND_FULL] == 1
    side.close_all()

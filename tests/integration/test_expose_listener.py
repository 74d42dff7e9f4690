"""An exposed TCP port's listener when the daemon runs out of descriptors: it stops
accepting for a while (one warning) instead of spinning on the waiting client, and accepts
it once descriptors are free again."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from typing import Any

import pytest

import nitro_netd.parent.expose as expose_module
from nitro_netd.netstack.events import HostEvent, TcpAccepted
from nitro_netd.parent.expose import ExposeSpec, TcpExposer, bind_exposed, parse_exposes
from nitro_netd.parent.host import ThrottledWarning
from tests.support.ports import free_port

DEADLINE = 5.0


async def test_out_of_descriptors_backs_off_once_then_accepts(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(expose_module, "ACCEPT_BACKOFF", 0.05)
    caplog.set_level(logging.WARNING, logger="nitro_netd.parent.expose")
    adopted: list[socket.socket] = []
    accepted = asyncio.Event()
    events: list[HostEvent] = []

    def adopt(flow: int, sock: socket.socket) -> None:
        adopted.append(sock)
        accepted.set()

    exposer = TcpExposer(asyncio.get_running_loop(), adopt, events.append, lambda: True)
    exposer.open(parse_exposes([str(free_port())]))
    port = next(iter(exposer.listeners.values()))[1].parent_port
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    client = socket.socket()
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        while True:
            try:
                held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        for _ in range(200):  # loop turns with the client waiting and no descriptor free
            await asyncio.sleep(0)
        warnings = [r for r in caplog.records if "accept on port" in r.getMessage()]
        assert len(warnings) == 1, f"{len(warnings)} warnings: the listener spun"
        assert "ulimit -n" in warnings[0].getMessage()
        assert not adopted
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        async with asyncio.timeout(DEADLINE):
            await accepted.wait()
        assert isinstance(events[0], TcpAccepted)
    finally:
        for sock in adopted:
            sock.close()
        client.close()
        exposer.close()


async def test_closing_during_a_back_off_cancels_it(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    exposer = TcpExposer(loop, lambda flow, sock: None, lambda event: None, lambda: True)
    exposer.open(parse_exposes([str(free_port())]))
    listener, item = next(iter(exposer.listeners.values()))
    exposer._back_off(listener, item, OSError(24, "Too many open files"))
    timers: list[Any] = list(exposer._backoffs.values())
    exposer.close()
    assert timers
    assert all(timer.cancelled() for timer in timers)


async def test_clients_reset_for_want_of_a_link_are_logged_once_per_10_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="nitro_netd.parent.expose")
    now = [100.0]
    exposer = TcpExposer(
        asyncio.get_running_loop(), lambda flow, sock: None, lambda event: None, lambda: False
    )
    exposer.no_link_log = ThrottledWarning(expose_module.logger, clock=lambda: now[0])
    exposer.open(parse_exposes([str(free_port())]))
    port = next(iter(exposer.listeners.values()))[1].parent_port

    async def connect_and_read() -> None:
        async with asyncio.timeout(DEADLINE):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                await reader.read()
            finally:
                writer.close()

    async def reset_client() -> None:
        """Connect and see the reset (at the connect already, or at the first read)."""
        with pytest.raises(ConnectionResetError):
            await connect_and_read()

    try:
        for _ in range(4):
            await reset_client()
        now[0] += 10.0
        await reset_client()
    finally:
        exposer.close()
    messages = [r.getMessage() for r in caplog.records if "no enclave link" in r.getMessage()]
    assert len(messages) == 2, messages
    assert "more like it" not in messages[0]
    assert messages[1].endswith("no enclave link: client reset (3 more like it not logged)")


def test_exposing_more_ports_than_descriptors_names_the_port_and_ulimit() -> None:
    port = free_port()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
        while True:
            try:
                held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        with pytest.raises(OSError, match=f"cannot expose tcp port {port}") as raised:
            bind_exposed(ExposeSpec("tcp", port, 80))
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert raised.value.errno == errno.EMFILE
    message = str(raised.value.strerror)
    assert message.startswith(f"cannot expose tcp port {port}: Too many open files")
    assert "ulimit -n" in message

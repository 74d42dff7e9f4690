"""An exposed TCP port's listener when the daemon runs out of descriptors: it stops
accepting for a while (one warning) instead of spinning on the waiting client, and accepts
it once descriptors are free again."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
from typing import Any

import pytest

import nitro_netd.parent.expose as expose_module
from nitro_netd.netstack.events import HostEvent, TcpAccepted
from nitro_netd.parent.expose import TcpExposer, parse_exposes
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

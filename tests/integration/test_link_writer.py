"""The parent's link writer: scatter-gather writes, exact accounting and backpressure."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from nitro_netd.link import FrameDecoder, LinkProtocol
from nitro_netd.parent.link_writer import LinkWriter


@pytest.mark.parametrize("protocol", list(LinkProtocol))
async def test_link_writer_delivers_frames_and_accounting_returns_to_zero(
    protocol: LinkProtocol,
) -> None:
    """Many frames through a small socket buffer: all arrive, and `queued` ends at 0 exactly
    (an off-by-header count once left the link paused forever after enough frames)."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    theirs.setblocking(False)
    events: list[bool] = []
    writer = LinkWriter(loop, ours.fileno(), protocol, events.append, high_water=64 << 10)
    frames = [os.urandom(14 + (i * 37) % 2000) for i in range(3000)]
    for start in range(0, len(frames), 100):
        writer.write_frames(list(frames[start : start + 100]))
    decoder = FrameDecoder(protocol)
    received: list[bytes] = []
    async with asyncio.timeout(20):
        while len(received) < len(frames):
            data = await loop.sock_recv(theirs, 1 << 16)
            decoder.receive_data(data)
            while (frame := decoder.maybe_next_frame()) is not None:
                received.append(bytes(frame))
    assert received == frames
    assert writer.queued == 0
    assert events[0] is False
    assert events[-1] is True
    writer.close()
    ours.close()
    theirs.close()

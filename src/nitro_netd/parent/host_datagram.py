"""What the UDP and ping host sides share: one non-blocking socket per flow, read by callbacks.

Theory of operation
-------------------
Each flow owns one socket, opened on its first send and registered with
`loop.add_reader`; its readable callback reads up to `READ_BATCH` datagrams into one
shared buffer and posts an event for each (no task per datagram, no stream objects).
Reading stops for every socket while the link to the enclave is backed up
(`set_link_paused`); the kernel's socket buffers then absorb (or drop) what arrives, as
they would for any UDP receiver. Errors caused by a command are posted with `call_soon`,
never from inside `execute()`, so the stack is never re-entered while being drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Final

from nitro_netd.frames.errors import DropReason
from nitro_netd.netstack.events import FlowId, HostEvent
from nitro_netd.parent.host import PostEvent, ThrottledWarning

logger = logging.getLogger(__name__)

READ_BATCH: Final = 64
"""Datagrams read per readable callback before other sockets get a turn."""
RECEIVE_SIZE: Final = 65536
"""Larger than any IPv4 datagram, so nothing is ever truncated on receive."""


class DatagramSockets:
    """The sockets of one datagram protocol's flows. Subclasses read them (`on_readable`)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        post_event: PostEvent,
        count_drop: Callable[[DropReason], None] = lambda reason: None,
    ) -> None:
        self.loop = loop
        self.post_event = post_event
        self.count_drop = count_drop
        """Counts a datagram dropped on the host side (the stack's counters)."""
        self.socket_warning = ThrottledWarning(logging.getLogger(type(self).__module__))
        """'Cannot open a socket' (every new flow, when out of descriptors), throttled."""
        self.sockets: dict[FlowId, socket.socket] = {}
        self.paused = False
        self.buffer = bytearray(RECEIVE_SIZE)

    def add(self, flow: FlowId, sock: socket.socket) -> None:
        """Own `sock` as the flow's socket and start reading it."""
        self.sockets[flow] = sock
        if not self.paused:
            self.loop.add_reader(sock.fileno(), self.on_readable, flow, sock)

    def close(self, flow: FlowId) -> None:
        """Close the flow's socket, if it has one."""
        sock = self.sockets.pop(flow, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def close_all(self) -> None:
        """Close every socket."""
        for flow in list(self.sockets):
            self.close(flow)

    def set_link_paused(self, paused: bool) -> None:
        """Stop (or restart) reading every socket while the link is backed up."""
        if paused == self.paused:
            return
        self.paused = paused
        for flow, sock in self.sockets.items():
            if paused:
                self.loop.remove_reader(sock.fileno())
            else:
                self.loop.add_reader(sock.fileno(), self.on_readable, flow, sock)

    def post_soon(self, event: HostEvent) -> None:
        """Post `event` from the loop, outside the current command's execution."""
        self.loop.call_soon(self.post_event, event)

    def on_readable(self, flow: FlowId, sock: socket.socket) -> None:
        """Read up to `READ_BATCH` datagrams; stop early if the flow was closed meanwhile."""
        view = memoryview(self.buffer)
        for _ in range(READ_BATCH):
            try:
                size, source = sock.recvfrom_into(self.buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.post_event(self.error_event(flow, exc))
                return
            self.on_datagram(flow, view[:size], source)
            if self.sockets.get(flow) is not sock:
                return

    def on_datagram(self, flow: FlowId, data: memoryview, source: tuple[str, int]) -> None:
        """Handle one datagram read from the flow's socket (post its event)."""
        raise NotImplementedError

    def error_event(self, flow: FlowId, exc: OSError) -> HostEvent:
        """The event that reports `exc` on the flow's socket."""
        raise NotImplementedError


def error_number(exc: OSError) -> int:
    """The errno of `exc`, or EIO when it has none."""
    return exc.errno if exc.errno is not None else errno.EIO


def close_quietly(sock: socket.socket) -> None:
    """Close a socket that failed half-way through being set up."""
    with contextlib.suppress(OSError):
        sock.close()

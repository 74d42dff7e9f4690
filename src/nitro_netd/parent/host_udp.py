"""Host UDP sockets for the netstack's UDP flows (and its DNS forwarder's queries).

Theory of operation
-------------------
One *connected* non-blocking UDP socket per flow, created on the flow's first `UdpSend`.
Connecting makes the parent's kernel keep only the peer's replies and report the ICMP
errors it receives for the flow (port unreachable -> ECONNREFUSED on the next send or
receive), which are posted as `UdpFailed(errno)`. A datagram the kernel cannot take right
now (full send buffer) is dropped, as a router would; UDP senders expect that.
"""

from __future__ import annotations

import logging
import socket
from ipaddress import IPv4Address
from typing import Any

from nitro_netd.frames.errors import DropReason
from nitro_netd.netstack.events import FlowId, HostEvent, UdpClose, UdpDatagram, UdpFailed, UdpSend
from nitro_netd.parent.host import descriptor_hint
from nitro_netd.parent.host_datagram import DatagramSockets, close_quietly, error_number

logger = logging.getLogger(__name__)


class HostUdp(DatagramSockets):
    """Executes `UdpSend` and `UdpClose` on connected host UDP sockets."""

    command_types: tuple[type, ...] = (UdpSend, UdpClose)

    def execute(self, command: Any) -> None:
        """Carry out one UDP command; host errors become `UdpFailed` events."""
        if isinstance(command, UdpSend):
            self._send(command)
        elif isinstance(command, UdpClose):
            self.close(command.flow)

    def _send(self, command: UdpSend) -> None:
        sock = self.sockets.get(command.flow) or self._open(command)
        if sock is None:
            return
        try:
            sock.send(command.data)
        except (BlockingIOError, InterruptedError):
            self.count_drop(DropReason.HOST_SEND_FULL)
            logger.debug("udp flow %d: send buffer full, datagram dropped", command.flow)
        except OSError as exc:
            self.post_soon(UdpFailed(command.flow, error_number(exc)))

    def _open(self, command: UdpSend) -> socket.socket | None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: this flow fails, nothing else
            self.socket_warning.warn(
                "udp flow %d: cannot open a socket: %s%s", command.flow, exc, descriptor_hint(exc)
            )
            self.post_soon(UdpFailed(command.flow, error_number(exc)))
            return None
        try:
            sock.setblocking(False)
            sock.connect((str(command.address), command.port))
        except OSError as exc:
            close_quietly(sock)
            logger.debug(
                "udp flow %d: cannot connect to %s: %s", command.flow, command.address, exc
            )
            self.post_soon(UdpFailed(command.flow, error_number(exc)))
            return None
        self.add(command.flow, sock)
        return sock

    def on_datagram(self, flow: FlowId, data: memoryview, source: tuple[str, int]) -> None:
        """Post the datagram as `UdpDatagram`."""
        self.post_event(UdpDatagram(flow, IPv4Address(source[0]), source[1], bytes(data)))

    def error_event(self, flow: FlowId, exc: OSError) -> HostEvent:
        """A receive error (ECONNREFUSED from an ICMP error) as `UdpFailed`."""
        return UdpFailed(flow, error_number(exc))

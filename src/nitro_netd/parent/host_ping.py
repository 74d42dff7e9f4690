"""Unprivileged ping sockets (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`) for ping flows.

Theory of operation
-------------------
One socket per flow, created on its first `PingSend`. The kernel gives each ping socket
its own echo identifier (and checks and completes the checksum), so a request is sent
with identifier 0 and the replies read back carry the kernel's identifier; the netstack
puts the enclave's own identifier back. Linux allows these sockets only to the groups in
`net.ipv4.ping_group_range`; when it forbids them the flow gets `PingFailed(EACCES)` and
the operator one warning saying which sysctl to set.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from typing import Any, Final

from nitro_netd.frames.errors import DropReason
from nitro_netd.frames.icmp import IcmpMessage, IcmpType, build_icmp
from nitro_netd.netstack.events import FlowId, HostEvent, PingClose, PingFailed, PingReply, PingSend
from nitro_netd.parent.host_datagram import DatagramSockets, close_quietly, error_number

logger = logging.getLogger(__name__)

PING_SYSCTL_HINT: Final = (
    "ping to the world needs sysctl net.ipv4.ping_group_range='0 2147483647'"
    " (ping sockets are not permitted for this daemon's group); until then pings beyond"
    " the parent are dropped"
)
_ECHO_HEADER: Final = struct.Struct("!BBHHH")
_DENIED: Final = frozenset({errno.EACCES, errno.EPERM})


class HostPing(DatagramSockets):
    """Executes `PingSend` and `PingClose` on unprivileged ping sockets."""

    command_types: tuple[type, ...] = (PingSend, PingClose)
    warned = False
    """Set once the warning that ping sockets are not permitted was logged."""

    def execute(self, command: Any) -> None:
        """Carry out one ping command; host errors become `PingFailed` events."""
        if isinstance(command, PingSend):
            self._send(command)
        elif isinstance(command, PingClose):
            self.close(command.flow)

    def _send(self, command: PingSend) -> None:
        sock = self.sockets.get(command.flow) or self._open(command.flow)
        if sock is None:
            return
        request = IcmpMessage(IcmpType.ECHO_REQUEST, 0, 0, command.sequence, command.payload)
        try:
            sock.sendto(build_icmp(request), (str(command.address), 0))
        except (BlockingIOError, InterruptedError):
            self.count_drop(DropReason.HOST_SEND_FULL)
            logger.debug("ping flow %d: send buffer full, request dropped", command.flow)
        except OSError as exc:
            self.post_soon(PingFailed(command.flow, error_number(exc)))

    def _open(self, flow: FlowId) -> socket.socket | None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        except OSError as exc:
            self._cannot_open(flow, exc)
            return None
        try:
            sock.setblocking(False)
        except OSError as exc:  # pragma: no cover - setblocking on a fresh socket
            close_quietly(sock)
            self._cannot_open(flow, exc)
            return None
        self.add(flow, sock)
        return sock

    def _cannot_open(self, flow: FlowId, exc: OSError) -> None:
        error = error_number(exc)
        if error in _DENIED and not self.warned:
            self.warned = True
            logger.warning(PING_SYSCTL_HINT)
        else:
            logger.debug("ping flow %d: cannot open a ping socket: %s", flow, exc)
        self.post_soon(PingFailed(flow, error))

    def on_datagram(self, flow: FlowId, data: memoryview, source: tuple[str, int]) -> None:
        """Post an echo reply as `PingReply` (the kernel has verified its checksum)."""
        if len(data) < _ECHO_HEADER.size:
            return
        icmp_type, code, _checksum, _identifier, sequence = _ECHO_HEADER.unpack_from(data)
        if icmp_type == IcmpType.ECHO_REPLY and code == 0:
            self.post_event(PingReply(flow, sequence, bytes(data[_ECHO_HEADER.size :])))

    def error_event(self, flow: FlowId, exc: OSError) -> HostEvent:
        """A receive error as `PingFailed`."""
        return PingFailed(flow, error_number(exc))

"""The host side of the shell: what executes the netstack's commands on real sockets.

Each protocol has one `HostSide` (TCP, UDP, ping). The bridge routes every command to the
side that declared its type and every side reports back through `post_event`, which feeds
the stack and flushes. Host errors never raise out of a side: they become events
(`TcpFailed(errno)`, `UdpFailed(errno)`...), which the stack turns into RST or ICMP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from nitro_netd.netstack.events import HostEvent

PostEvent = Callable[[HostEvent], None]


class HostSide(Protocol):
    """Executes one protocol's commands on host sockets."""

    @property
    def command_types(self) -> tuple[type, ...]:
        """The command classes this side executes."""

    def execute(self, command: Any) -> None:
        """Carry out one command (never raises on host errors: they become events)."""

    def set_link_paused(self, paused: bool) -> None:
        """Stop (or restart) reading host sockets while the link to the enclave is backed up."""

    def close_all(self) -> None:
        """Close every socket (link replaced, or the daemon stopping)."""

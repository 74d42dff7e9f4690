"""The host side of the shell: what executes the netstack's commands on real sockets.

Each protocol has one `HostSide` (TCP, UDP, ping). The bridge routes every command to the
side that declared its type and every side reports back through `post_event`, which feeds
the stack and flushes. Host errors never raise out of a side: they become events
(`TcpFailed(errno)`, `UdpFailed(errno)`...), which the stack turns into RST or ICMP.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from nitro_netd.netstack.events import HostEvent

PostEvent = Callable[[HostEvent], None]

SOCKET_WARNING_INTERVAL: Final = 10.0
"""Seconds between two warnings that sockets cannot be opened (the rest are counted)."""


def descriptor_hint(exc: OSError) -> str:
    """What to do about `exc` when it means the daemon ran out of descriptors."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return "; raise the open-files limit (ulimit -n, or LimitNOFILE= in its unit)"
    return ""


class ThrottledWarning:
    """A warning that can recur once per flow (out of descriptors: every SYN, every DNS
    query) logged at most once per `interval` seconds, with how many were not logged."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = SOCKET_WARNING_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self.suppressed = 0
        self._next = 0.0

    def warn(self, message: str, *args: object) -> None:
        """Log `message % args` unless one was logged within `interval` (then count it)."""
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return
        self._next = now + self.interval
        if self.suppressed:
            message += f" ({self.suppressed} more like it not logged)"
            self.suppressed = 0
        self.logger.warning(message, *args)


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

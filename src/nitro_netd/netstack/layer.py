"""The shape every transport-protocol layer of the stack has (TCP, UDP, ICMP...)."""

from __future__ import annotations

from typing import Protocol

from nitro_netd.frames.ipv4 import IPv4Header
from nitro_netd.netstack.events import HostEvent


class Layer(Protocol):
    """A protocol layer: IP packets and host events in, output through `StackOutput`.

    Its timer and its deferred output change only in `receive`, `handle_event`,
    `handle_timer` and `reset`: the stack asks `before_flush()` and `get_timer()` only of
    the layers it called one of those on since it last asked.
    """

    def receive(self, header: IPv4Header, body: memoryview, now: float) -> None:
        """Handle one IPv4 packet from the enclave; raise `FrameError` to drop it."""

    def handle_event(self, event: HostEvent, now: float) -> None:
        """Handle an event from the host side addressed to this layer."""

    def handle_timer(self, now: float) -> None:
        """Run the timers due at `now`."""

    def get_timer(self) -> float | None:
        """The earliest time this layer wants `handle_timer()`, or None."""

    def before_flush(self) -> None:
        """Emit what was deferred until the end of a batch (coalesced ACKs)."""

    def reset(self) -> None:
        """The link was replaced: forget (and reset) every flow."""

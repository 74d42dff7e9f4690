"""The netstack: the parent's userspace network stack, as a sans-IO state machine.

Theory of operation
-------------------
The enclave's kernel believes it sits on an Ethernet segment with a router at
192.168.127.1. Every frame it sends arrives here through `receive_frame()`; every frame
this stack wants delivered is queued and drained by the shell with `frames_to_send()`.
The stack owns the link's "router side": ARP and ICMP echo for its own addresses, and
(in later layers) the translation of TCP and UDP flows onto host sockets, which it asks
the shell to open and drive through commands drained with `commands_to_send()`; what
happens on those sockets comes back through `handle_host_event()`.

Time is an argument (`now`, seconds on any monotonic clock); the stack asks to be called
again at `get_timer()` through `handle_timer()`. Nothing here does I/O or reads a clock,
so every path can be driven by hand in a unit test.

Dispatch is by table: EtherType -> handler, then IP protocol -> handler. Decoding errors
raise `FrameError` inside a handler and are caught in exactly one place,
`receive_frame()`, which counts the drop by reason. Enclave input never raises out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.arp import build_arp
from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.ethernet import EtherType, MacAddress, build_ethernet, parse_ethernet
from nitro_netd.frames.ipv4 import IpProto, IPv4Header, build_ipv4_header, parse_ipv4
from nitro_netd.netstack.arp import handle_arp
from nitro_netd.netstack.config import StackConfig
from nitro_netd.netstack.events import HostCommand, HostEvent
from nitro_netd.netstack.icmp import answer_echo
from nitro_netd.netstack.stats import StackStats

logger = logging.getLogger(__name__)

_Handler = Callable[["NetStack", memoryview, float], None]
_IpHandler = Callable[["NetStack", IPv4Header, memoryview, float], None]
_ETHERNET_MIN_PAYLOAD: Final = 46


class NetStack:
    """The sans-IO network stack. See the module docstring for the theory of operation."""

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self.stats = StackStats()
        self._frames: list[bytes] = []
        self._commands: list[HostCommand] = []
        self._neighbours: dict[IPv4Address, MacAddress] = {}
        self._ip_identification = 0

    # --- input -------------------------------------------------------------------

    def receive_frame(self, frame: bytes | bytearray | memoryview, *, now: float) -> None:
        """Process one Ethernet frame from the enclave.

        May queue frames and commands (drain them after the call). Never raises on any
        input: malformed or unhandled frames are counted in `stats.drops`. If this raises,
        that is a bug.
        """
        self.stats.frames_in += 1
        self.stats.bytes_in += len(frame)
        try:
            header, payload = parse_ethernet(frame)
            if (
                header.destination != self.config.gateway_mac
                and not header.destination.is_multicast
            ):
                raise FrameError(DropReason.NOT_FOR_US, f"to MAC {header.destination}")
            handler = _ETHER_HANDLERS.get(header.ethertype)
            if handler is None:
                raise FrameError(
                    DropReason.UNSUPPORTED_ETHERTYPE, f"ethertype {header.ethertype:#06x}"
                )
            handler(self, payload, now)
        except FrameError as exc:
            self.stats.count_drop(exc.reason)
            logger.debug("dropped frame from enclave: %s", exc)

    def handle_host_event(self, event: HostEvent, *, now: float) -> None:
        """React to something that happened on a host socket. May queue frames and commands."""
        logger.debug("host event with no flow layer yet: %r", event)

    def handle_timer(self, *, now: float) -> None:
        """Run whatever timers are due at `now`. May queue frames and commands."""

    def get_timer(self) -> float | None:
        """Return when `handle_timer()` should next be called, or None for never."""
        return None

    def handle_link_reset(self) -> None:
        """Forget everything tied to the old link (a new enclave link replaced it)."""
        self._neighbours.clear()

    # --- output ------------------------------------------------------------------

    def frames_to_send(self) -> list[bytes]:
        """Return and clear the frames queued for the enclave, oldest first."""
        frames, self._frames = self._frames, []
        return frames

    def commands_to_send(self) -> list[HostCommand]:
        """Return and clear the commands queued for the shell, oldest first."""
        commands, self._commands = self._commands, []
        return commands

    # --- helpers for protocol handlers ----------------------------------------------

    def enclave_mac(self) -> MacAddress:
        """The enclave's MAC: learned from ARP, else the configured one."""
        return self._neighbours.get(self.config.enclave_ip, self.config.enclave_mac)

    def send_ethernet(self, ethertype: int, payload: bytes) -> None:
        """Queue a frame to the enclave from the gateway MAC."""
        frame = build_ethernet(self.enclave_mac(), self.config.gateway_mac, ethertype, payload)
        if len(frame) < 14 + _ETHERNET_MIN_PAYLOAD:
            frame += bytes(14 + _ETHERNET_MIN_PAYLOAD - len(frame))
        self.stats.frames_out += 1
        self.stats.bytes_out += len(frame)
        self._frames.append(frame)

    def send_ipv4(
        self, source: IPv4Address, destination: IPv4Address, protocol: int, payload: bytes
    ) -> None:
        """Queue an IPv4 packet to the enclave."""
        self._ip_identification = (self._ip_identification + 1) & 0xFFFF
        header = build_ipv4_header(
            source, destination, protocol, len(payload), identification=self._ip_identification
        )
        self.send_ethernet(EtherType.IPV4, header + payload)

    # --- handlers ----------------------------------------------------------------

    def _on_arp(self, payload: memoryview, now: float) -> None:
        """Answer ARP for our addresses and learn the enclave's MAC."""
        reply = handle_arp(self.config, payload, self._neighbours)
        if reply is not None:
            self.send_ethernet(EtherType.ARP, build_arp(reply))

    def _on_ipv4(self, payload: memoryview, now: float) -> None:
        """Validate an IPv4 packet from the enclave and dispatch it by protocol."""
        header, body = parse_ipv4(payload)
        if header.source != self.config.enclave_ip:
            raise FrameError(DropReason.BAD_SOURCE, f"IPv4 from {header.source}")
        handler = _IP_HANDLERS.get(header.protocol)
        if handler is None:
            raise FrameError(DropReason.UNSUPPORTED_PROTOCOL, f"IP protocol {header.protocol}")
        handler(self, header, body, now)

    def _on_icmp(self, header: IPv4Header, body: memoryview, now: float) -> None:
        """Answer pings to our own addresses."""
        if header.destination not in self.config.local_ips:
            raise FrameError(DropReason.NOT_IMPLEMENTED, f"ICMP to {header.destination}")
        reply = answer_echo(body)
        self.send_ipv4(header.destination, header.source, IpProto.ICMP, reply)

    def _on_unimplemented(self, header: IPv4Header, body: memoryview, now: float) -> None:
        """Count TCP and UDP until the flow layers land."""
        raise FrameError(
            DropReason.NOT_IMPLEMENTED, f"IP protocol {header.protocol} to {header.destination}"
        )


_ETHER_HANDLERS: Final[dict[int, _Handler]] = {
    EtherType.ARP: NetStack._on_arp,
    EtherType.IPV4: NetStack._on_ipv4,
}
_IP_HANDLERS: Final[dict[int, _IpHandler]] = {
    IpProto.ICMP: NetStack._on_icmp,
    IpProto.TCP: NetStack._on_unimplemented,
    IpProto.UDP: NetStack._on_unimplemented,
}

"""The netstack: the parent's userspace network stack, as a sans-IO state machine.

Theory of operation
-------------------
The enclave's kernel believes it sits on an Ethernet segment with a router at
192.168.127.1. Every frame it sends arrives here through `receive_frame()`; every frame
this stack wants delivered is queued and drained by the shell with `frames_to_send()`.
The stack owns the link's "router side": ARP for its own addresses, and one *layer* per
IP protocol (ICMP, TCP, UDP) that translates the enclave's packets into commands on host
sockets (drained with `commands_to_send()`) and host events (`handle_host_event()`) back
into packets.

Time is an argument (`now`, seconds on any monotonic clock); the stack asks to be called
again at `get_timer()` through `handle_timer()`. Nothing here does I/O or reads a clock,
so every path can be driven by hand in a unit test.

Dispatch is by table: EtherType -> handler, IP protocol -> layer, event type -> layer.
Decoding errors raise `FrameError` anywhere below and are caught in exactly one place,
`receive_frame()`, which counts the drop by reason. Enclave input never raises out.
Work a layer defers to the end of a batch (coalesced ACKs) is emitted when the shell
drains the stack: `drain()` (both queues, large segments kept as `SplitFrame` so they are
written without copying), or `frames_to_send()` and `commands_to_send()` one at a time.

Only the layers that had input since the last batch are asked to end it, and each layer's
earliest timer is kept until the layer has input again: a TCP round trip does not pay for
asking the UDP and ICMP layers, every batch, what has not changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from nitro_netd.frames.arp import build_arp
from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.ethernet import EtherType, parse_ethernet
from nitro_netd.frames.ipv4 import IpProto, parse_ipv4
from nitro_netd.netstack.arp import handle_arp
from nitro_netd.netstack.config import StackConfig
from nitro_netd.netstack.datagram import FlowBudget
from nitro_netd.netstack.events import HostCommand, HostEvent
from nitro_netd.netstack.icmp import PING_EVENTS, IcmpLayer
from nitro_netd.netstack.layer import Layer
from nitro_netd.netstack.output import Frame, SplitFrame, StackOutput
from nitro_netd.netstack.spans import HostSlice
from nitro_netd.netstack.stats import StackStats
from nitro_netd.netstack.tcp import TCP_EVENTS, TcpLayer
from nitro_netd.netstack.udp import UDP_EVENTS, UdpLayer

logger = logging.getLogger(__name__)

_Handler = Callable[["NetStack", memoryview, float], None]


class NetStack:
    """The sans-IO network stack. See the module docstring for the theory of operation."""

    def __init__(self, config: StackConfig | None = None, *, isn_seed: int = 0) -> None:
        """Create a stack; `isn_seed` varies TCP initial sequence numbers (pass randomness)."""
        self.config = config or StackConfig()
        self.stats = StackStats()
        self.output = StackOutput(self.config, self.stats)
        self.layers: dict[int, Layer] = {}
        self.event_routes: dict[type, Layer] = {}
        self._unflushed: dict[Layer, None] = {}
        """Layers with input since the last end of batch (`before_flush()` is owed), in the
        order they had it (dicts, not sets: the order of calls never depends on addresses)."""
        self._timers_stale: dict[Layer, None] = {}
        """Layers whose timer may have changed since `get_timer()` last asked them."""
        self._timers: dict[Layer, float | None] = {}
        """Each layer's earliest timer, as it last said."""
        datagram_budget = FlowBudget(self.config.max_udp_flows)
        self.add_layer(IpProto.ICMP, IcmpLayer(self.output, datagram_budget), PING_EVENTS)
        self.add_layer(IpProto.UDP, UdpLayer(self.output, datagram_budget), UDP_EVENTS)
        self.tcp = TcpLayer(self.output, isn_seed=isn_seed)
        self.add_layer(IpProto.TCP, self.tcp, TCP_EVENTS)

    def add_layer(self, protocol: int, layer: Layer, events: tuple[type, ...]) -> None:
        """Register the layer for an IP protocol and the host events it consumes."""
        old = self.layers.get(protocol)
        if old is not None:
            for table in (self._unflushed, self._timers_stale, self._timers):
                table.pop(old, None)
        self.layers[protocol] = layer
        for event_type in events:
            self.event_routes[event_type] = layer
        self._touch(layer)

    def _touch(self, layer: Layer) -> None:
        """`layer` had input: it ends the next batch and its timer is asked again."""
        self._unflushed[layer] = None
        self._timers_stale[layer] = None

    # --- input -------------------------------------------------------------------

    def receive_frame(self, frame: bytes | bytearray | memoryview, *, now: float) -> None:
        """Process one Ethernet frame from the enclave.

        May queue frames and commands (drain them after the call). Never raises on any
        input: malformed or unhandled frames are counted in `stats.drops`. If this raises,
        that is a bug.
        """
        self.stats.frames_in += 1
        self.stats.bytes_in += len(frame)
        tcp = self.tcp
        self._unflushed[tcp] = None  # _touch() inline; before the call, which may raise (a bug)
        self._timers_stale[tcp] = None
        if tcp.receive_fast(frame, now):
            return
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
        layer = self.event_routes.get(type(event))
        if layer is None:
            logger.warning("host event with no layer to take it: %r", event)
            return
        self._touch(layer)
        layer.handle_event(event, now)

    def handle_timer(self, *, now: float) -> None:
        """Run whatever timers are due at `now`. May queue frames and commands."""
        self.get_timer()  # refresh the timers of layers that had input
        for layer, when in list(self._timers.items()):
            if when is not None and when <= now:
                self._touch(layer)
                layer.handle_timer(now)

    def get_timer(self) -> float | None:
        """Return when `handle_timer()` should next be called, or None for never."""
        timers = self._timers
        for layer in self._timers_stale:
            timers[layer] = layer.get_timer()
        self._timers_stale.clear()
        earliest: float | None = None
        for when in timers.values():  # a plain loop: this runs after every batch
            if when is not None and (earliest is None or when < earliest):
                earliest = when
        return earliest

    def set_checksum_offload(self, enabled: bool) -> None:
        """Switch checksum offload for the current link (see `StackOutput.checksum_offload`).

        Call right after `handle_link_reset()` for a new link, before its first frame.
        """
        self.output.checksum_offload = enabled

    def set_segmentation_offload(self, enabled: bool) -> None:
        """Switch TCP segmentation offload for the current link (`StackOutput.segment_size`).

        Call right after `handle_link_reset()` for a new link, before its first frame.
        """
        self.output.segmentation_offload = enabled

    def handle_link_reset(self) -> None:
        """Forget everything tied to the old link (a new enclave link replaced it)."""
        self.output.neighbours.clear()
        for layer in self.layers.values():
            self._touch(layer)
            layer.reset()

    def handle_link_up(self) -> None:
        """A link is up (its offloads set): tell the enclave which of its connections the
        previous link took (`TcpLayer.announce_resets`)."""
        self._touch(self.tcp)
        self.tcp.announce_resets()

    # --- output ------------------------------------------------------------------

    def frames_to_send(
        self, resolve: Callable[[HostSlice], bytes] | None = None
    ) -> list[bytes | bytearray]:
        """Return and clear the frames queued for the enclave, oldest first, each whole
        (`resolve` gives the bytes of payloads the shell holds, `HostSlice`s).

        Ends the batch first: layers emit what they deferred (one ACK per flow, one
        coalesced `TcpSend` per flow), so drain this and `commands_to_send()` after each call.
        """
        self._end_batch()
        frames, self.output.frames = self.output.frames, []
        return [_whole(f, resolve) if isinstance(f, SplitFrame) else f for f in frames]

    def commands_to_send(self) -> list[HostCommand]:
        """Return and clear the commands queued for the shell, oldest first (ends the batch)."""
        self._end_batch()
        commands, self.output.commands = self.output.commands, []
        return commands

    def drain(self) -> tuple[list[HostCommand], list[Frame]]:
        """End the batch once and return (and clear) both queues: the commands, and the
        frames with large segments still split as headers and a payload view
        (`SplitFrame`), for the shell to write without copying. Its one call per flush."""
        self._end_batch()
        output = self.output
        commands, output.commands = output.commands, []
        frames, output.frames = output.frames, []
        return commands, frames

    def _end_batch(self) -> None:
        unflushed = self._unflushed
        if not unflushed:
            return
        self._unflushed = {}
        self._timers_stale |= unflushed  # ending a batch may arm timers (delayed ACKs)
        error: Exception | None = None
        for layer in unflushed:
            try:
                layer.before_flush()
            except Exception as exc:  # a bug: the other layers still end their batch
                error = error or exc
        if error is not None:
            raise error

    # --- handlers ----------------------------------------------------------------

    def _on_arp(self, payload: memoryview, now: float) -> None:
        """Answer ARP for our addresses and learn the enclave's MAC."""
        reply = handle_arp(self.config, payload, self.output.neighbours)
        if reply is not None:
            self.output.send_ethernet(EtherType.ARP, build_arp(reply))

    def _on_ipv4(self, payload: memoryview, now: float) -> None:
        """Validate an IPv4 packet from the enclave and hand it to its protocol's layer."""
        header, body = parse_ipv4(payload)
        if header.source != self.config.enclave_ip:
            raise FrameError(DropReason.BAD_SOURCE, f"IPv4 from {header.source}")
        layer = self.layers.get(header.protocol)
        if layer is None:
            raise FrameError(DropReason.UNSUPPORTED_PROTOCOL, f"IP protocol {header.protocol}")
        self._touch(layer)
        layer.receive(header, body, now)


_ETHER_HANDLERS: Final[dict[int, _Handler]] = {
    EtherType.ARP: NetStack._on_arp,
    EtherType.IPV4: NetStack._on_ipv4,
}


def _whole(frame: SplitFrame, resolve: Callable[[HostSlice], bytes] | None) -> bytes:
    payload = frame.payload
    if isinstance(payload, HostSlice):
        if resolve is None:
            raise TypeError("a frame's payload is held by the shell: pass `resolve`")
        return bytes(frame.head) + resolve(payload)
    return bytes(frame)

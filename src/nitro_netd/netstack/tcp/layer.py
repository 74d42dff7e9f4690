"""The TCP layer: the flow table, SYN handling, event routing and the timer heap.

Theory of operation
-------------------
Each enclave connection is a `TcpConnection` keyed by (enclave port, remote address,
remote port) and named by a `FlowId` that the shell uses for its host socket. A SYN from
the enclave opens a flow and asks the shell to connect (`TcpConnect`); everything after
that is the connection's business. Segments matching no flow are answered with RST
(RFC 9293 §3.10.7.1) and counted as `no_flow`.

When the link to the enclave is lost or replaced (`reset`) every flow is forgotten and its
host socket aborted; the enclave's kernel may keep its end (the agent reconnects, tap0
stays). So the layer remembers where each established flow stood and, once a link is up
again (`announce_resets`), sends the enclave one RST per flow: a connection waiting for
data (a long poll, a pooled idle one) ends at once instead of never.

Every segment or event that touches a flow marks it; `before_flush()` lets each marked
flow send the one ACK it owes for the whole batch. Retransmission deadlines live in a
heap with lazy invalidation: at most one live entry per flow, checked against the flow's
current deadline when it reaches the top, so re-arming on every ACK costs O(1) mostly.
"""

from __future__ import annotations

import heapq
import logging
import struct
from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.checksum import fold, ones_complement_sum
from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.ipv4 import IPv4Header
from nitro_netd.frames.tcp import TcpFlags, TcpHeader, parse_tcp
from nitro_netd.netstack.config import StackConfig
from nitro_netd.netstack.dns import dns_upstream_for_tcp
from nitro_netd.netstack.events import (
    FlowId,
    HostEvent,
    TcpAccepted,
    TcpClose,
    TcpConnected,
    TcpData,
    TcpEof,
    TcpFailed,
    TcpWriteBlocked,
    TcpWriteUnblocked,
    UdpInbound,
)
from nitro_netd.netstack.nat import nat_from_enclave, nat_from_host
from nitro_netd.netstack.output import StackOutput
from nitro_netd.netstack.tcp.connection import TcpConnection, TcpState
from nitro_netd.netstack.tcp.inbound import InboundConnection
from nitro_netd.netstack.tcp.segments import SegmentBuilder
from nitro_netd.netstack.tcp.seq import seq_add

logger = logging.getLogger("nitro_netd.netstack.tcp")

FlowKey = tuple[int, IPv4Address, int]
"""(enclave port, remote address as the enclave sees it, remote port)."""
TCP_EVENTS = (
    TcpAccepted,
    TcpConnected,
    TcpData,
    TcpEof,
    TcpFailed,
    TcpWriteBlocked,
    TcpWriteUnblocked,
)
DNS_PORT = 53
_FAST_MIN: Final = 54
_IPV4_NO_OPTIONS: Final = b"\x08\x00\x45"
"""EtherType IPv4, then version 4 with a 20-byte header."""
_TCP: Final = 6
_SYN_RST: Final = int(TcpFlags.SYN | TcpFlags.RST)
_FAST_FIELDS: Final = struct.Struct("!6s6x3sxH2xHxB2x4s4sHHIIBBH")
"""The fields the fast path reads, from the Ethernet destination to the TCP window: one
unpack instead of a slice per check."""
_IP_HEADER_WORDS: Final = struct.Struct("!10H")
"""total length, (identification), flags and fragment offset."""


def _sum_addresses(frame: bytes | bytearray | memoryview) -> int:
    """The one's complement sum of the IPv4 source and destination (pseudo-header part)."""
    words: tuple[int, int, int, int] = _ADDRESS_WORDS.unpack_from(frame, 26)
    return sum(words)


_ADDRESS_WORDS: Final = struct.Struct("!HHHH")


class TcpLayer:
    """Owns every TCP flow. See the module docstring for the theory of operation."""

    def __init__(self, output: StackOutput, *, isn_seed: int = 0) -> None:
        self.output = output
        self.config: StackConfig = output.config
        self.flows: dict[FlowId, TcpConnection] = {}
        self.by_key: dict[FlowKey, TcpConnection] = {}
        self._fast: dict[tuple[int, bytes, int], TcpConnection] = {}
        """The same flows keyed by raw fields, for `receive_fast()`."""
        self._gateway_mac = self.config.gateway_mac.octets
        self._enclave_ip = self.config.enclave_ip.packed
        self._keys: dict[FlowId, FlowKey] = {}
        self._pending_connects: set[FlowId] = set()
        self._touched: set[FlowId] = set()
        self._heap: list[tuple[float, FlowId]] = []
        self._heap_at: dict[FlowId, float] = {}
        self._next_flow = 1
        self._isn_seed = isn_seed & 0xFFFFFFFF
        self._orphans: list[tuple[FlowKey, int, int]] = []
        """(key, seq, ack) of the established flows a lost link took: RSTs owed (two for a
        flow with bytes in flight: the enclave takes a RST only at exactly its rcv_nxt)."""

    # --- enclave input --------------------------------------------------------------

    def receive(self, header: IPv4Header, body: memoryview, now: float) -> None:
        """Handle one TCP segment from the enclave."""
        tcp, payload = parse_tcp(
            body,
            source=header.source,
            destination=header.destination,
            verify_checksum=not self.output.checksum_offload,
        )
        key = (tcp.source_port, header.destination, tcp.destination_port)
        conn = self.by_key.get(key)
        if conn is None:
            if tcp.flags & (TcpFlags.SYN | TcpFlags.ACK | TcpFlags.RST) == TcpFlags.SYN:
                self._open(header, tcp, body, now)
                return
            self._reset_stray(header, tcp, len(payload))
            raise FrameError(
                DropReason.NO_FLOW,
                f"TCP {tcp.flags!r} to {header.destination}:{tcp.destination_port}",
            )
        try:
            conn.on_segment(tcp, payload, now)
        finally:  # even after a bug: the flow's bytes (views of this frame) leave in this batch
            self._after(conn)

    def receive_fast(self, frame: bytes | bytearray | memoryview, now: float) -> bool:
        """Handle a plain data/ACK segment of a known flow without building header objects.

        Returns False (having done nothing) for anything unusual — another EtherType or
        protocol, IP options or fragments, SYN or RST, a bad checksum, an unknown flow —
        which then takes the full path, where every check and drop count lives.
        """
        if len(frame) < _FAST_MIN:
            return False
        (mac, ether_ip, total, fragment, protocol, source, destination,
         sport, dport, seq, ack, offset, flags, window) = _FAST_FIELDS.unpack_from(frame)  # fmt: skip
        if (
            ether_ip != _IPV4_NO_OPTIONS
            or protocol != _TCP
            or mac != self._gateway_mac
            or source != self._enclave_ip
            or fragment & 0x3FFF
            or total < 40
            or total + 14 > len(frame)
        ):
            return False
        conn = self._fast.get((sport, destination, dport))
        header_length = (offset >> 4) * 4
        if conn is None or flags & _SYN_RST or header_length < 20 or header_length > total - 20:
            return False
        if fold(sum(_IP_HEADER_WORDS.unpack_from(frame, 14))) != 0xFFFF:
            return False
        view = memoryview(frame)
        if not self.output.checksum_offload:
            pseudo = _sum_addresses(frame) + _TCP + total - 20
            if ones_complement_sum(view[34 : 14 + total], pseudo) != 0xFFFF:
                return False
        payload = view[34 + header_length : 14 + total]
        try:
            conn.on_fields(seq, ack, flags, window, payload, now)
        finally:  # even after a bug: the flow's bytes (views of this frame) leave in this batch
            self._after(conn)
        return True

    def _open(self, header: IPv4Header, tcp: TcpHeader, body: memoryview, now: float) -> None:
        target = self._host_target(header.destination, tcp.destination_port)
        if target is None or not self._has_room(header, tcp):
            self._reset_stray(header, tcp, 0)
            return
        flow = self._next_flow
        self._next_flow += 1
        builder = self._builder(header.destination, tcp.destination_port, tcp.source_port)
        conn = TcpConnection(
            flow,
            self.output,
            builder,
            tcp,
            iss=self._isn(flow),
            buffer=self.config.tcp_buffer,
            mss=self.config.mtu - 40,
            on_timer_change=self._on_timer_change,
        )
        conn.syn_quote = bytes(body[:8])
        key = (tcp.source_port, header.destination, tcp.destination_port)
        self._register(flow, key, conn)
        self._pending_connects.add(flow)
        conn.log.debug("SYN: connecting to %s:%d", *target)
        self.output.send_command(
            conn.connect_command(target[0], target[1], self.config.connect_timeout)
        )

    def _host_target(self, destination: IPv4Address, port: int) -> tuple[IPv4Address, int] | None:
        """Where a connection from the enclave goes on the host, or None to refuse it."""
        if port == 0:
            return None
        if destination == self.config.gateway_ip:
            upstream = dns_upstream_for_tcp(self.config) if port == DNS_PORT else None
            return None if upstream is None else (upstream, self.config.dns_port)
        return nat_from_enclave(self.config, destination), port

    def _has_room(self, header: IPv4Header, tcp: TcpHeader) -> bool:
        if len(self.flows) >= self.config.max_tcp_flows:
            limit = f"{self.config.max_tcp_flows} TCP flows"
        elif len(self._pending_connects) >= self.config.max_pending_connects:
            limit = f"{self.config.max_pending_connects} pending connects"
        else:
            return True
        self.output.stats.count_drop(DropReason.LIMIT)
        logger.warning(
            "[tcp %s:%d→%s:%d] refused: limit of %s reached",
            header.source,
            tcp.source_port,
            header.destination,
            tcp.destination_port,
            limit,
        )
        return False

    def _reset_stray(self, header: IPv4Header, tcp: TcpHeader, payload_length: int) -> None:
        """Answer a segment that has no flow with RST (never a RST to a RST)."""
        if tcp.flags & TcpFlags.RST:
            return
        builder = self._builder(header.destination, tcp.destination_port, tcp.source_port)
        if tcp.flags & TcpFlags.ACK:
            frame = builder.build(tcp.ack, 0, TcpFlags.RST, 0)
        else:
            length = (
                payload_length
                + (1 if tcp.flags & TcpFlags.SYN else 0)
                + (1 if tcp.flags & TcpFlags.FIN else 0)
            )
            frame = builder.build(0, seq_add(tcp.seq, length), TcpFlags.RST | TcpFlags.ACK, 0)
        self.output.send_frame(frame)

    def announce_resets(self) -> None:
        """A link is up: reset the enclave's ends of the flows the last link took."""
        orphans, self._orphans = self._orphans, []
        for (enclave_port, remote, remote_port), seq, ack in orphans:
            builder = self._builder(remote, remote_port, enclave_port)
            self.output.send_frame(builder.build(seq, ack, TcpFlags.RST | TcpFlags.ACK, 0))
        if orphans:
            logger.info("reset %d connections the enclave had through the lost link", len(orphans))

    def _builder(self, remote: IPv4Address, remote_port: int, enclave_port: int) -> SegmentBuilder:
        """A frame builder for segments from `remote:remote_port` to the enclave's port."""
        return SegmentBuilder(
            self.output.checksum_offload,
            self.output.enclave_mac(),
            self.config.gateway_mac,
            remote,
            self.config.enclave_ip,
            remote_port,
            enclave_port,
        )

    def _isn(self, flow: FlowId) -> int:
        return (self._isn_seed + flow * 0x9E3779B9) & 0xFFFFFFFF

    # --- host events ----------------------------------------------------------------

    def handle_event(self, event: HostEvent, now: float) -> None:
        """Route a host event to its flow (events for forgotten flows are ignored)."""
        if isinstance(event, TcpAccepted):
            self._open_inbound(event, now)
            return
        if isinstance(event, UdpInbound):
            return
        conn = self.flows.get(event.flow)
        if conn is None:
            return
        if isinstance(event, TcpData):
            conn.on_host_data(event.data, now)
        elif isinstance(event, TcpConnected):
            self._pending_connects.discard(event.flow)
            conn.on_host_connected(now)
        elif isinstance(event, TcpEof):
            conn.on_host_eof(now)
        elif isinstance(event, TcpFailed):
            self._pending_connects.discard(event.flow)
            conn.on_host_failed(event.errno, now, data_lost=event.data_lost)
        elif isinstance(event, TcpWriteBlocked | TcpWriteUnblocked):
            conn.on_write_blocked(isinstance(event, TcpWriteBlocked))
        self._after(conn)

    def _open_inbound(self, event: TcpAccepted, now: float) -> None:
        """A client of an exposed port: send our SYN to the enclave on its behalf."""
        remote = nat_from_host(self.config, event.address)
        key = (event.enclave_port, remote, event.port)
        if key in self.by_key or len(self.flows) >= self.config.max_tcp_flows:
            self.output.stats.count_drop(DropReason.LIMIT)
            logger.warning(
                "[tcp %s:%d→:%d] refused: flow exists or limit reached",
                remote,
                event.port,
                event.enclave_port,
            )
            self.output.send_command(TcpClose(event.flow, reset=True))
            return
        builder = self._builder(remote, event.port, event.enclave_port)
        conn = InboundConnection(
            event.flow,
            self.output,
            builder,
            iss=self._isn(event.flow),
            buffer=self.config.tcp_buffer,
            mss=self.config.mtu - 40,
            give_up_at=now + self.config.connect_timeout,
            on_timer_change=self._on_timer_change,
        )
        self._register(event.flow, key, conn)
        conn.log.debug("accepted: opening towards the enclave")
        conn.start(now)

    def _register(self, flow: FlowId, key: FlowKey, conn: TcpConnection) -> None:
        self.flows[flow], self.by_key[key], self._keys[flow] = conn, conn, key
        self._fast[(key[0], key[1].packed, key[2])] = conn

    def _after(self, conn: TcpConnection) -> None:
        if conn.state is TcpState.CLOSED:
            self._forget(conn)
        else:
            self._touched.add(conn.flow)

    def _forget(self, conn: TcpConnection) -> None:
        self.flows.pop(conn.flow, None)
        self._pending_connects.discard(conn.flow)
        self._touched.discard(conn.flow)
        key = self._keys.pop(conn.flow, None)
        if key is not None and self.by_key.get(key) is conn:
            del self.by_key[key]
            del self._fast[(key[0], key[1].packed, key[2])]

    # --- batching, timers, reset ------------------------------------------------------

    def before_flush(self) -> None:
        """Send the one ACK each touched flow owes for this batch."""
        for flow in self._touched:
            conn = self.flows.get(flow)
            if conn is not None:
                conn.flush_ack()
        self._touched.clear()

    def _on_timer_change(self, conn: TcpConnection) -> None:
        deadline = conn.deadline
        if deadline is None:
            return
        current = self._heap_at.get(conn.flow)
        if current is None or deadline < current:
            heapq.heappush(self._heap, (deadline, conn.flow))
            self._heap_at[conn.flow] = deadline

    def get_timer(self) -> float | None:
        """The earliest live retransmission deadline."""
        heap = self._heap
        while heap:
            when, flow = heap[0]
            if self._heap_at.get(flow) != when:
                heapq.heappop(heap)
                continue
            conn = self.flows.get(flow)
            if conn is None or conn.deadline is None:
                heapq.heappop(heap)
                del self._heap_at[flow]
                continue
            if conn.deadline > when:
                heapq.heapreplace(heap, (conn.deadline, flow))
                self._heap_at[flow] = conn.deadline
                continue
            return when
        return None

    def handle_timer(self, now: float) -> None:
        """Fire every retransmission deadline that is due."""
        while (when := self.get_timer()) is not None and when <= now:
            _, flow = heapq.heappop(self._heap)
            del self._heap_at[flow]
            conn = self.flows[flow]
            conn.on_timer(now)
            self._after(conn)

    def reset(self) -> None:
        """The link was replaced: abort every host socket and forget every flow (owing
        the enclave a RST for each established one, `announce_resets`)."""
        for flow, conn in list(self.flows.items()):
            key = self._keys.get(flow)
            live = conn.state is TcpState.ESTABLISHED and conn.syn_acked
            if key is not None and live and len(self._orphans) < self.config.max_tcp_flows:
                self._orphans.append((key, conn.snd_nxt, conn.rcv_nxt))
                if conn.snd_una != conn.snd_nxt:  # the enclave may not have them all
                    self._orphans.append((key, conn.snd_una, conn.rcv_nxt))
            conn.reset()
        self.flows.clear()
        self.by_key.clear()
        self._fast.clear()
        self._keys.clear()
        self._pending_connects.clear()
        self._touched.clear()
        self._heap.clear()
        self._heap_at.clear()

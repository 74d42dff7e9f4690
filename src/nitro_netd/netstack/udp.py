"""UDP from the enclave: per-flow NAT onto connected host sockets, with idle expiry.

Theory of operation
-------------------
A flow is one (enclave port, remote address, remote port), the remote as the enclave
sees it. The first datagram opens it: the host side creates one *connected* UDP socket
for the flow on its first `UdpSend`, so the parent's kernel filters replies to that peer
and reports ICMP errors as `UdpFailed(ECONNREFUSED)`, which become an ICMP port
unreachable to the enclave quoting its last datagram. Replies (`UdpDatagram`) go back to
the enclave's port with the NAT reversed (`nat_from_host`: 127.0.0.1 is the host alias).
Any traffic keeps a flow alive; after `udp_idle_timeout` without any, `UdpClose`.

There is no fragmentation anywhere: the link MTU is ours, so the enclave never sends a
datagram too big for it, and a host datagram that would not fit is dropped and counted.
Datagrams to the gateway are its DNS server (`DnsForwarder`, port 53) or get a port
unreachable. UDP and ping flows share one `FlowBudget` (`max_udp_flows`); a datagram that
would open a flow past it is dropped as `limit`.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.icmp import UnreachableCode
from nitro_netd.frames.ipv4 import IpProto, IPv4Header
from nitro_netd.frames.udp import UdpHeader, parse_udp
from nitro_netd.netstack.datagram import (
    DatagramFlow,
    FlowBudget,
    IdleTable,
    send_udp,
)
from nitro_netd.netstack.dns import DNS_PORT
from nitro_netd.netstack.dns_forward import DnsForwarder
from nitro_netd.netstack.events import (
    FlowId,
    HostEvent,
    UdpClose,
    UdpDatagram,
    UdpFailed,
    UdpInbound,
    UdpReply,
    UdpSend,
)
from nitro_netd.netstack.flowlog import FlowLogger, flow_logger
from nitro_netd.netstack.icmp import UNREACHABLE_FOR_ERRNO, build_unreachable
from nitro_netd.netstack.nat import nat_from_enclave, nat_from_host
from nitro_netd.netstack.output import StackOutput

logger = logging.getLogger(__name__)

UDP_EVENTS: Final = (UdpDatagram, UdpInbound, UdpFailed)
"""The host events the UDP layer consumes."""
_NO_HEADER: Final = IPv4Header(IPv4Address(0), IPv4Address(0), IpProto.UDP, 0, 0, 20)
"""Placeholder for flows that have not yet carried an enclave datagram."""
UdpKey = tuple[int, IPv4Address, int]
"""(enclave port, remote address as the enclave sees it, remote port)."""


@dataclass(slots=True)
class UdpFlow(DatagramFlow):
    """One UDP flow and what an ICMP error for it must quote."""

    enclave_port: int
    remote: IPv4Address
    remote_port: int
    log: FlowLogger
    last_header: IPv4Header
    last_head: bytes
    """The first 8 bytes (the UDP header) of the enclave's last datagram."""
    inbound_port: int | None = None
    """For a client of an exposed UDP port: that parent port (replies leave through it)."""


class UdpLayer:
    """UDP flows between the enclave and connected host sockets, and the gateway's DNS."""

    def __init__(self, output: StackOutput, budget: FlowBudget | None = None) -> None:
        self.output = output
        self.config = output.config
        budget = budget or FlowBudget(self.config.max_udp_flows)
        self.flows: IdleTable[UdpKey, UdpFlow] = IdleTable(self.config.udp_idle_timeout, budget)
        self.dns = DnsForwarder(output, budget, self._new_id)
        self._last_id = 0

    def receive(self, header: IPv4Header, body: memoryview, now: float) -> None:
        """Forward a datagram from the enclave (or serve it, for the gateway)."""
        udp, payload = parse_udp(
            body,
            source=header.source,
            destination=header.destination,
            verify_checksum=not self.output.checksum_offload,
        )
        if udp.source_port == 0 or udp.destination_port == 0:
            raise FrameError(DropReason.BAD_HEADER, f"UDP port 0 ({udp})")
        if header.destination == self.config.gateway_ip:
            self._to_gateway(header, body, udp, payload, now)
            return
        address = nat_from_enclave(self.config, header.destination)
        flow = self._flow_for(header, udp, now)
        flow.last_header, flow.last_head = header, bytes(body[:8])
        self.flows.touch(flow, now)
        if flow.inbound_port is not None:
            reply = UdpReply(flow.inbound_port, address, udp.destination_port, bytes(payload))
            self.output.send_command(reply)
            return
        send = UdpSend(flow.id, address, udp.destination_port, bytes(payload))
        self.output.send_command(send)

    def handle_event(self, event: HostEvent, now: float) -> None:
        """A datagram or an error on a host UDP socket."""
        if isinstance(event, UdpInbound):
            self._inbound(event, now)
            return
        if self.dns.owns(event.flow):
            self.dns.handle_event(event, now)
            return
        flow = self.flows.get_by_id(event.flow)
        if flow is None:
            logger.debug("event for a closed UDP flow: %r", event)
        elif isinstance(event, UdpDatagram):
            self._deliver(flow, event, now)
        elif isinstance(event, UdpFailed):
            self._failed(flow, event.errno)

    def _inbound(self, event: UdpInbound, now: float) -> None:
        """A client of an exposed port: deliver its datagram from its real address."""
        remote = nat_from_host(self.config, event.address)
        key = (event.enclave_port, remote, event.port)
        flow = self.flows.get(key)
        if flow is None:
            if not self.flows.budget.try_take("UDP datagrams"):
                self.output.stats.count_drop(DropReason.LIMIT)
                return
            log = flow_logger(
                logger, f"udp {remote}:{event.port}→{self.config.enclave_ip}:{event.enclave_port}"
            )
            flow = UdpFlow(
                self._new_id(),
                now,
                key[0],
                remote,
                event.port,
                log,
                _NO_HEADER,
                b"",
                event.parent_port,
            )
            self.flows.add(key, flow)
            log.debug("opened from exposed port %d", event.parent_port)
        self.flows.touch(flow, now)
        if not send_udp(self.output, remote, event.port, event.enclave_port, event.data):
            flow.log.debug("datagram of %d bytes exceeds the MTU: dropped", len(event.data))

    def handle_timer(self, now: float) -> None:
        """Close idle flows; move timed-out DNS queries on."""
        for flow in self.flows.pop_expired(now):
            flow.log.debug("idle: closed")
            if flow.inbound_port is None:
                self.output.send_command(UdpClose(flow.id))
        self.dns.handle_timer(now)

    def get_timer(self) -> float | None:
        """The next idle expiry or DNS deadline."""
        expiry, dns = self.flows.next_expiry(), self.dns.get_timer()
        if expiry is None or dns is None:
            return dns if expiry is None else expiry
        return min(expiry, dns)

    def before_flush(self) -> None:
        """Nothing deferred."""

    def reset(self) -> None:
        """Close every flow's host socket and abandon pending DNS queries."""
        for flow in self.flows.pop_all():
            self.output.send_command(UdpClose(flow.id))
        self.dns.reset()

    # --- helpers -----------------------------------------------------------------

    def _new_id(self) -> FlowId:
        self._last_id += 1
        return self._last_id

    def _to_gateway(
        self, header: IPv4Header, body: memoryview, udp: UdpHeader, payload: memoryview, now: float
    ) -> None:
        if udp.destination_port == DNS_PORT:
            self.dns.receive_query(udp.source_port, payload, now)
            return
        icmp = build_unreachable(UnreachableCode.PORT, header, bytes(body[:8]))
        self.output.send_ipv4(header.destination, header.source, IpProto.ICMP, icmp)
        raise FrameError(DropReason.NOT_FOR_US, f"UDP to gateway port {udp.destination_port}")

    def _flow_for(self, header: IPv4Header, udp: UdpHeader, now: float) -> UdpFlow:
        key = (udp.source_port, header.destination, udp.destination_port)
        flow = self.flows.get(key)
        if flow is not None:
            return flow
        if not self.flows.budget.try_take("UDP datagrams"):
            raise FrameError(DropReason.LIMIT, f"no flow left for UDP to {header.destination}")
        name = f"udp {header.source}:{key[0]}→{key[1]}:{key[2]}"
        log = flow_logger(logger, name)
        flow = UdpFlow(self._new_id(), now, key[0], key[1], key[2], log, header, b"")
        self.flows.add(key, flow)
        log.debug("opened")
        return flow

    def _deliver(self, flow: UdpFlow, event: UdpDatagram, now: float) -> None:
        source = nat_from_host(self.config, event.address)
        if send_udp(self.output, source, event.port, flow.enclave_port, event.data):
            self.flows.touch(flow, now)
        else:
            flow.log.debug("datagram of %d bytes exceeds the MTU: dropped", len(event.data))

    def _failed(self, flow: UdpFlow, error: int) -> None:
        flow.log.debug("host socket: %s", errno.errorcode.get(error, str(error)))
        code = UNREACHABLE_FOR_ERRNO.get(error)
        if code is not None:
            icmp = build_unreachable(code, flow.last_header, flow.last_head)
            self.output.send_ipv4(flow.remote, self.config.enclave_ip, IpProto.ICMP, icmp)

"""ICMP on the link: echo for the gateway, ping forwarding, and destination unreachable.

Theory of operation
-------------------
Echo requests to the gateway are answered here. Every other echo request is forwarded
through an unprivileged ping socket on the parent (`PingSend`), one flow per (enclave
identifier, destination); the host alias becomes 127.0.0.1 (`nat_from_enclave`). The
parent's kernel picks its own identifier for each ping socket, so the flow remembers the
enclave's and writes it back into every `PingReply`. Flows idle for
`ping_idle_timeout` are closed (`PingClose`).

If the parent forbids ping sockets (`net.ipv4.ping_group_range`), the host side reports
`PingFailed(EACCES)`: the request is dropped and counted, except that pings to the host
alias are then answered here (127.0.0.1 is always up, so the answer is the truth).

`build_unreachable()` is shared with UDP: host errors (ECONNREFUSED, EHOSTUNREACH) become
destination unreachable messages that quote the enclave's packet (RFC 792).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.icmp import IcmpMessage, IcmpType, UnreachableCode, build_icmp, parse_icmp
from nitro_netd.frames.ipv4 import IpProto, IPv4Header, build_ipv4_header
from nitro_netd.netstack.datagram import (
    DatagramFlow,
    FlowBudget,
    IdleTable,
)
from nitro_netd.netstack.events import HostEvent, PingClose, PingFailed, PingReply, PingSend
from nitro_netd.netstack.flowlog import FlowLogger, flow_logger
from nitro_netd.netstack.nat import nat_from_enclave
from nitro_netd.netstack.output import StackOutput

logger = logging.getLogger(__name__)

ICMP_OVERHEAD: Final = 28
"""IPv4 and ICMP echo headers around an echo payload."""
UNREACHABLE_FOR_ERRNO: Final[dict[int, UnreachableCode]] = {
    errno.ECONNREFUSED: UnreachableCode.PORT,
    errno.EHOSTUNREACH: UnreachableCode.HOST,
    errno.ENETUNREACH: UnreachableCode.NET,
}
"""The ICMP destination unreachable code the enclave gets for a host socket's errno."""
_DENIED: Final = errno.EACCES
"""What opening a ping socket fails with when `ping_group_range` excludes us."""

PING_EVENTS: Final = (PingReply, PingFailed)
"""The host events the ICMP layer consumes."""
PingKey = tuple[int, IPv4Address]
"""(the enclave's echo identifier, the destination as the enclave sees it)."""


def parse_echo_request(payload: memoryview) -> IcmpMessage:
    """Decode an ICMP echo request.

    Raises:
        FrameError: malformed ICMP, or a type other than echo request.
    """
    message = parse_icmp(payload)
    if message.type != IcmpType.ECHO_REQUEST or message.code != 0:
        raise FrameError(
            DropReason.UNSUPPORTED_ICMP, f"ICMP type={message.type} code={message.code}"
        )
    return message


def build_echo_reply(request: IcmpMessage) -> bytes:
    """The echo reply to `request`: same identifier, sequence and data."""
    return build_icmp(
        IcmpMessage(IcmpType.ECHO_REPLY, 0, request.identifier, request.sequence, request.payload)
    )


def answer_echo(payload: memoryview) -> bytes:
    """Return the ICMP echo reply for an echo request to one of our own addresses.

    Raises:
        FrameError: malformed ICMP, or a type other than echo request.
    """
    return build_echo_reply(parse_echo_request(payload))


# RFC 792 "Destination Unreachable Message": the internet header + 64 bits of data.
def build_unreachable(code: int, header: IPv4Header, head: bytes) -> bytes:
    """An ICMP destination unreachable quoting the packet (`header`, then `head[:8]`)."""
    quoted = build_ipv4_header(
        header.source,
        header.destination,
        header.protocol,
        header.total_length - header.header_length,
        ttl=header.ttl,
        identification=header.identification,
        dont_fragment=header.dont_fragment,
    )
    return build_icmp(IcmpMessage(IcmpType.DEST_UNREACHABLE, code, 0, 0, quoted + head[:8]))


@dataclass(slots=True)
class PingFlow(DatagramFlow):
    """One enclave ping (identifier, destination) and its host ping socket."""

    identifier: int
    destination: IPv4Address
    log: FlowLogger
    last_header: IPv4Header
    last_request: IcmpMessage


class IcmpLayer:
    """Answers pings to the gateway and forwards the others to the parent's ping sockets."""

    def __init__(self, output: StackOutput, budget: FlowBudget | None = None) -> None:
        self.output = output
        self.config = output.config
        budget = budget or FlowBudget(self.config.max_udp_flows)
        self.flows: IdleTable[PingKey, PingFlow] = IdleTable(self.config.ping_idle_timeout, budget)
        self.host_ping_denied = False
        self._next_id = 0

    def receive(self, header: IPv4Header, body: memoryview, now: float) -> None:
        """Answer an echo request to the gateway; forward any other."""
        request = parse_echo_request(body)
        destination = header.destination
        if destination == self.config.gateway_ip or (
            destination == self.config.host_alias_ip and self.host_ping_denied
        ):
            self._reply(destination, build_echo_reply(request))
            return
        address = nat_from_enclave(self.config, destination)
        flow = self._flow_for(header, request, now)
        flow.last_header, flow.last_request = header, request
        self.flows.touch(flow, now)
        self.output.send_command(PingSend(flow.id, address, request.sequence, request.payload))

    def handle_event(self, event: HostEvent, now: float) -> None:
        """A reply or an error on a flow's ping socket."""
        if not isinstance(event, PingReply | PingFailed):
            return
        flow = self.flows.get_by_id(event.flow)
        if flow is None:
            logger.debug("event for a closed ping flow: %r", event)
        elif isinstance(event, PingReply):
            self._deliver(flow, event, now)
        elif isinstance(event, PingFailed):
            self._failed(flow, event.errno)

    def handle_timer(self, now: float) -> None:
        """Close the ping sockets of idle flows."""
        for flow in self.flows.pop_expired(now):
            flow.log.debug("idle: closed")
            self.output.send_command(PingClose(flow.id))

    def get_timer(self) -> float | None:
        """When the least recently used ping flow expires."""
        return self.flows.next_expiry()

    def before_flush(self) -> None:
        """Nothing deferred."""

    def reset(self) -> None:
        """Close every ping flow."""
        for flow in self.flows.pop_all():
            self.output.send_command(PingClose(flow.id))

    # --- helpers -----------------------------------------------------------------

    def _flow_for(self, header: IPv4Header, request: IcmpMessage, now: float) -> PingFlow:
        key = (request.identifier, header.destination)
        flow = self.flows.get(key)
        if flow is not None:
            return flow
        if not self.flows.budget.try_take("pings"):
            raise FrameError(DropReason.LIMIT, f"no flow left for ping to {header.destination}")
        self._next_id += 1
        name = f"ping {header.source}→{header.destination} id={request.identifier}"
        log = flow_logger(logger, name)
        flow = PingFlow(self._next_id, now, request.identifier, key[1], log, header, request)
        self.flows.add(key, flow)
        log.debug("opened")
        return flow

    def _deliver(self, flow: PingFlow, event: PingReply, now: float) -> None:
        if len(event.payload) + ICMP_OVERHEAD > self.config.mtu:
            self.output.stats.count_drop(DropReason.LIMIT)
            flow.log.debug("reply of %d bytes exceeds the MTU: dropped", len(event.payload))
            return
        self.flows.touch(flow, now)
        reply = IcmpMessage(IcmpType.ECHO_REPLY, 0, flow.identifier, event.sequence, event.payload)
        self._reply(flow.destination, build_icmp(reply))

    def _failed(self, flow: PingFlow, error: int) -> None:
        name = errno.errorcode.get(error, str(error))
        if error == _DENIED:
            self._denied(flow)
            return
        flow.log.debug("host ping socket: %s", name)
        code = UNREACHABLE_FOR_ERRNO.get(error)
        if code is not None:
            quote = build_icmp(flow.last_request)
            self._reply(flow.destination, build_unreachable(code, flow.last_header, quote))

    def _denied(self, flow: PingFlow) -> None:
        """The parent forbids ping sockets: the flow is gone; the alias is answered here."""
        self.host_ping_denied = True
        self.flows.remove(flow)
        self.output.send_command(PingClose(flow.id))
        if flow.destination == self.config.host_alias_ip:
            self._reply(flow.destination, build_echo_reply(flow.last_request))
            return
        self.output.stats.count_drop(DropReason.NOT_IMPLEMENTED)
        flow.log.debug("ping sockets not permitted on the parent: dropped")

    def _reply(self, source: IPv4Address, icmp: bytes) -> None:
        self.output.send_ipv4(source, self.config.enclave_ip, IpProto.ICMP, icmp)

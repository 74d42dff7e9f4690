"""The gateway's DNS server (192.168.127.1:53 over UDP): local names, else the parent's resolvers.

Theory of operation
-------------------
A query for one of `StackConfig.host_names` is answered here (A -> the host alias, any
other type -> NOERROR with no records). Every other query is forwarded *raw* (unchanged
bytes, so every record type and EDNS option passes through) to the parent's resolvers,
`StackConfig.dns_servers`, in order. Each attempt is its own UDP flow for the host side
(a fresh connected socket, so a fresh source port per query): the first answer with the
query's ID is relayed unchanged to the enclave and the flow closed; an answer too big for
the link goes as its header and question with TC set, so the client asks again over TCP.
An attempt that times out (`dns_timeout`) or fails on the host (ECONNREFUSED...) moves on
to the next resolver; when none is left, or none is configured, the enclave gets SERVFAIL
with its ID and question, never NXDOMAIN. Attempts expire in the order they started, so the pending
queries sit in an `OrderedDict` whose first entry is always the next deadline.
"""

from __future__ import annotations

import errno
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.netstack.datagram import FlowBudget, send_udp
from nitro_netd.netstack.dns import (
    DNS_PORT,
    DnsQuery,
    build_local_answer,
    build_servfail,
    is_local_name,
    parse_query,
    truncate_response,
)
from nitro_netd.netstack.events import (
    FlowId,
    HostEvent,
    UdpClose,
    UdpDatagram,
    UdpFailed,
    UdpInbound,
    UdpSend,
)
from nitro_netd.netstack.flowlog import FlowLogger, flow_logger
from nitro_netd.netstack.output import StackOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    """A query waiting for an upstream answer."""

    flow: FlowId
    enclave_port: int
    query: DnsQuery
    raw: bytes
    server: int
    deadline: float
    log: FlowLogger


class DnsForwarder:
    """The DNS server at the gateway, run inside the UDP layer."""

    def __init__(
        self, output: StackOutput, budget: FlowBudget, new_id: Callable[[], FlowId]
    ) -> None:
        self.output = output
        self.config = output.config
        self.budget = budget
        self.new_id = new_id
        self.pending: OrderedDict[FlowId, _Pending] = OrderedDict()

    def owns(self, flow: FlowId) -> bool:
        """True if `flow` is one of the forwarder's upstream attempts."""
        return flow in self.pending

    def receive_query(self, enclave_port: int, payload: memoryview, now: float) -> None:
        """Answer a query to the gateway, or forward it upstream.

        Raises:
            FrameError: not a parseable DNS query, or the flow limit is reached.
        """
        query = parse_query(payload)
        if query.header.is_response:
            raise FrameError(DropReason.BAD_HEADER, "DNS response sent to the gateway")
        log = self._logger(enclave_port, query)
        if query.header.opcode == 0 and is_local_name(self.config, query.question):
            log.debug("answered locally")
            self._reply(enclave_port, build_local_answer(query, self.config.host_alias_ip))
        elif not self.config.dns_servers:
            log.info("no upstream resolver configured: SERVFAIL")
            self._reply(enclave_port, build_servfail(query))
        elif not self.budget.try_take("DNS queries"):
            raise FrameError(DropReason.LIMIT, "no flow left for a DNS query")
        else:
            pending = _Pending(0, enclave_port, query, bytes(payload), 0, now, log)
            self._attempt(pending, now)

    def handle_event(self, event: HostEvent, now: float) -> None:
        """An upstream answer or failure for one of the attempts."""
        if isinstance(event, UdpInbound):
            return
        pending = self.pending.get(event.flow)
        if pending is None:
            return
        if isinstance(event, UdpFailed):
            self._finish_attempt(pending)
            name = errno.errorcode.get(event.errno, str(event.errno))
            self._next_server(pending, now, f"failed ({name})")
        elif not isinstance(event, UdpDatagram):
            return
        elif event.data[:2] != pending.raw[:2]:
            pending.log.debug("answer with another ID ignored")
        else:
            self._finish_attempt(pending)
            self.budget.give_back()
            if not send_udp(
                self.output, self.config.gateway_ip, DNS_PORT, pending.enclave_port, event.data
            ):
                size = len(event.data)
                pending.log.debug("answer of %d bytes exceeds the MTU: sent truncated (TC)", size)
                self._reply(pending.enclave_port, truncate_response(event.data, pending.query))

    def handle_timer(self, now: float) -> None:
        """Move timed-out queries on to their next resolver (or SERVFAIL)."""
        while self.pending:
            pending = next(iter(self.pending.values()))
            if pending.deadline > now:
                break
            self._finish_attempt(pending)
            self._next_server(pending, now, "timed out")

    def get_timer(self) -> float | None:
        """The earliest attempt deadline."""
        for pending in self.pending.values():
            return pending.deadline
        return None

    def reset(self) -> None:
        """Abandon every query (the link is gone)."""
        for pending in list(self.pending.values()):
            self._finish_attempt(pending)
            self.budget.give_back()

    # --- helpers -----------------------------------------------------------------

    def _attempt(self, pending: _Pending, now: float) -> None:
        pending.flow = self.new_id()
        pending.deadline = now + self.config.dns_timeout
        self.pending[pending.flow] = pending
        server = self.config.dns_servers[pending.server]
        command = UdpSend(pending.flow, server, self.config.dns_port, pending.raw)
        self.output.send_command(command)

    def _finish_attempt(self, pending: _Pending) -> None:
        del self.pending[pending.flow]
        self.output.send_command(UdpClose(pending.flow))

    def _next_server(self, pending: _Pending, now: float, why: str) -> None:
        server = self.config.dns_servers[pending.server]
        pending.server += 1
        if pending.server < len(self.config.dns_servers):
            pending.log.debug("resolver %s %s: trying the next", server, why)
            self._attempt(pending, now)
            return
        pending.log.info("resolver %s %s, none left: SERVFAIL", server, why)
        self.budget.give_back()
        self._reply(pending.enclave_port, build_servfail(pending.query))

    def _reply(self, enclave_port: int, data: bytes) -> None:
        send_udp(self.output, self.config.gateway_ip, DNS_PORT, enclave_port, data)

    def _logger(self, enclave_port: int, query: DnsQuery) -> FlowLogger:
        c = self.config
        question = query.question
        name = (
            f"dns {c.enclave_ip}:{enclave_port}→{c.gateway_ip}:{DNS_PORT} "
            f"#{query.header.id} {question.name} type {question.qtype}"
        )
        return flow_logger(logger, name)

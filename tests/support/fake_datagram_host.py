"""FakeDatagramHost: executes the netstack's UDP and ping commands in memory.

It keeps the sockets a real host side would have open (per flow), records every
datagram and echo request sent, and can answer like an echo server, so unit tests can
drive `NetStack` from both ends without a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address

from nitro_netd.netstack import (
    FlowId,
    NetStack,
    PingClose,
    PingReply,
    PingSend,
    StackConfig,
    UdpClose,
    UdpDatagram,
    UdpSend,
)
from tests.support.fake_enclave import FakeEnclave

MAX_ROUNDS = 100


@dataclass
class FakeDatagramHost:
    """The host end of UDP and ping flows, in memory."""

    udp_sockets: dict[FlowId, tuple[IPv4Address, int]] = field(default_factory=dict)
    ping_sockets: dict[FlowId, IPv4Address] = field(default_factory=dict)
    sent: list[UdpSend] = field(default_factory=list)
    pings: list[PingSend] = field(default_factory=list)
    closed: list[FlowId] = field(default_factory=list)

    def run(self, stack: NetStack) -> list[UdpSend | PingSend]:
        """Execute every queued command; return the sends among them, in order."""
        sends: list[UdpSend | PingSend] = []
        for command in stack.commands_to_send():
            if isinstance(command, UdpSend):
                self.udp_sockets.setdefault(command.flow, (command.address, command.port))
                assert self.udp_sockets[command.flow] == (command.address, command.port)
                self.sent.append(command)
                sends.append(command)
            elif isinstance(command, PingSend):
                self.ping_sockets.setdefault(command.flow, command.address)
                self.pings.append(command)
                sends.append(command)
            elif isinstance(command, UdpClose):
                assert self.udp_sockets.pop(command.flow, None) is not None, command
                self.closed.append(command.flow)
            elif isinstance(command, PingClose):
                assert self.ping_sockets.pop(command.flow, None) is not None, command
                self.closed.append(command.flow)
        return sends

    def echo(self, stack: NetStack, *, now: float) -> int:
        """Answer every send like an echo server until the stack is quiet; return the count."""
        answered = 0
        for _ in range(MAX_ROUNDS):
            sends = self.run(stack)
            if not sends:
                return answered
            for send in sends:
                stack.handle_host_event(echo_of(send), now=now)
                answered += 1
        raise AssertionError(f"no quiet after {MAX_ROUNDS} rounds")


def echo_of(send: UdpSend | PingSend) -> UdpDatagram | PingReply:
    """The event an echo server's answer to `send` produces."""
    if isinstance(send, UdpSend):
        return UdpDatagram(send.flow, send.address, send.port, send.data)
    return PingReply(send.flow, send.sequence, send.payload)


def datagram_rig(config: StackConfig) -> tuple[NetStack, FakeEnclave, FakeDatagramHost]:
    """A stack with `config`, an enclave that builds frames for it, and an in-memory host."""
    return NetStack(config), FakeEnclave(config), FakeDatagramHost()

"""ICMP on the link: echo replies for the addresses the stack owns."""

from __future__ import annotations

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.icmp import IcmpMessage, IcmpType, build_icmp, parse_icmp
from nitro_netd.frames.ipv4 import IpProto, IPv4Header
from nitro_netd.netstack.events import HostEvent
from nitro_netd.netstack.output import StackOutput


def answer_echo(payload: memoryview) -> bytes:
    """Return the ICMP echo reply for an echo request to one of our own addresses.

    Raises:
        FrameError: malformed ICMP, or a type other than echo request.
    """
    message = parse_icmp(payload)
    if message.type != IcmpType.ECHO_REQUEST or message.code != 0:
        raise FrameError(
            DropReason.UNSUPPORTED_ICMP, f"ICMP type={message.type} code={message.code}"
        )
    reply = IcmpMessage(
        IcmpType.ECHO_REPLY, 0, message.identifier, message.sequence, message.payload
    )
    return build_icmp(reply)


class IcmpLayer:
    """Answers pings to the gateway and the host alias."""

    def __init__(self, output: StackOutput) -> None:
        self.output = output

    def receive(self, header: IPv4Header, body: memoryview, now: float) -> None:
        """Answer an echo request to one of our addresses."""
        if header.destination not in self.output.config.local_ips:
            raise FrameError(DropReason.NOT_IMPLEMENTED, f"ICMP to {header.destination}")
        self.output.send_ipv4(header.destination, header.source, IpProto.ICMP, answer_echo(body))

    def handle_event(self, event: HostEvent, now: float) -> None:
        """No host side yet."""

    def handle_timer(self, now: float) -> None:
        """No timers."""

    def get_timer(self) -> float | None:
        """No timers."""
        return None

    def before_flush(self) -> None:
        """Nothing deferred."""

    def reset(self) -> None:
        """No state."""

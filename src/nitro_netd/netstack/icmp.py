"""ICMP on the link: echo replies for the addresses the stack owns."""

from __future__ import annotations

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.icmp import IcmpMessage, IcmpType, build_icmp, parse_icmp


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

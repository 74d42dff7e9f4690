"""ARP on the link: answer for the addresses the stack owns, learn the enclave's MAC."""

from __future__ import annotations

from ipaddress import IPv4Address

from nitro_netd.frames.arp import ArpOp, ArpPacket, parse_arp
from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.ethernet import MacAddress
from nitro_netd.netstack.config import StackConfig


def handle_arp(
    config: StackConfig, payload: memoryview, learn: dict[IPv4Address, MacAddress]
) -> ArpPacket | None:
    """Return the ARP reply to send for `payload`, or None for a reply we only learn from.

    The stack answers for the addresses it owns (the gateway and the host alias); a
    gratuitous ARP or a reply only teaches us the enclave's MAC.

    Raises:
        FrameError: malformed ARP, or a request for an address we do not answer.
    """
    packet = parse_arp(payload)
    if packet.sender_ip == config.enclave_ip:
        learn[packet.sender_ip] = packet.sender_mac
    if packet.op == ArpOp.REPLY:
        return None
    if packet.op != ArpOp.REQUEST:
        raise FrameError(DropReason.UNSUPPORTED_ARP, f"ARP op {packet.op}")
    target = packet.target_ip
    if target not in config.local_ips:
        raise FrameError(DropReason.NOT_FOR_US, f"ARP who-has {target}")
    return ArpPacket(ArpOp.REPLY, config.gateway_mac, target, packet.sender_mac, packet.sender_ip)

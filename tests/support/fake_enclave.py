"""FakeEnclave: builds the frames an enclave kernel would send and parses the replies.

Uses only the project's own `frames/` codecs, so netstack tests need no kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address

from nitro_netd.frames.arp import ArpOp, ArpPacket, build_arp, parse_arp
from nitro_netd.frames.ethernet import (
    BROADCAST_MAC,
    EtherType,
    MacAddress,
    build_ethernet,
    parse_ethernet,
)
from nitro_netd.frames.icmp import IcmpMessage, IcmpType, build_icmp, parse_icmp
from nitro_netd.frames.ipv4 import IpProto, build_ipv4_header, parse_ipv4
from nitro_netd.frames.udp import UdpHeader, build_udp, parse_udp
from nitro_netd.netstack.config import StackConfig


@dataclass
class FakeEnclave:
    """The enclave end of the link, as frames."""

    config: StackConfig = field(default_factory=StackConfig)

    @property
    def mac(self) -> MacAddress:
        return self.config.enclave_mac

    @property
    def ip(self) -> IPv4Address:
        return self.config.enclave_ip

    def arp_request(self, target: IPv4Address) -> bytes:
        """Who-has `target`, broadcast."""
        packet = ArpPacket(ArpOp.REQUEST, self.mac, self.ip, MacAddress(bytes(6)), target)
        return build_ethernet(BROADCAST_MAC, self.mac, EtherType.ARP, build_arp(packet))

    def ipv4(self, destination: IPv4Address, protocol: int, payload: bytes) -> bytes:
        """An IPv4 packet from the enclave to the gateway MAC."""
        header = build_ipv4_header(self.ip, destination, protocol, len(payload))
        return build_ethernet(self.config.gateway_mac, self.mac, EtherType.IPV4, header + payload)

    def ping(
        self,
        destination: IPv4Address,
        identifier: int = 7,
        sequence: int = 1,
        data: bytes = b"ping",
    ) -> bytes:
        """An ICMP echo request."""
        message = IcmpMessage(IcmpType.ECHO_REQUEST, 0, identifier, sequence, data)
        return self.ipv4(destination, IpProto.ICMP, build_icmp(message))

    def udp(
        self,
        destination: IPv4Address,
        source_port: int,
        destination_port: int,
        data: bytes = b"datagram",
    ) -> bytes:
        """A UDP datagram from the enclave's `source_port`."""
        datagram = build_udp(self.ip, destination, source_port, destination_port, data)
        return self.ipv4(destination, IpProto.UDP, datagram)

    def parse_arp_reply(self, frame: bytes | bytearray) -> ArpPacket:
        """Decode a frame that must be an ARP packet to us."""
        header, payload = parse_ethernet(frame)
        assert header.ethertype == EtherType.ARP
        assert header.destination == self.mac
        return parse_arp(payload)

    def parse_icmp_reply(self, frame: bytes | bytearray) -> tuple[IPv4Address, IcmpMessage]:
        """Decode a frame that must be ICMP to us; return (source, message)."""
        header, payload = parse_ethernet(frame)
        assert header.ethertype == EtherType.IPV4
        assert header.destination == self.mac
        ip, body = parse_ipv4(payload)
        assert ip.protocol == IpProto.ICMP
        assert ip.destination == self.ip
        return ip.source, parse_icmp(body)

    def parse_udp_reply(self, frame: bytes | bytearray) -> tuple[IPv4Address, UdpHeader, bytes]:
        """Decode a frame that must be UDP to us; return (source, header, payload)."""
        header, payload = parse_ethernet(frame)
        assert header.ethertype == EtherType.IPV4
        assert header.destination == self.mac
        ip, body = parse_ipv4(payload)
        assert ip.protocol == IpProto.UDP
        assert ip.destination == self.ip
        udp, data = parse_udp(body, source=ip.source, destination=ip.destination)
        return ip.source, udp, bytes(data)

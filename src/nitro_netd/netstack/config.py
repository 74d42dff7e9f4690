"""The netstack's configuration: address plan, limits and timeouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Final

from nitro_netd.frames.ethernet import MacAddress

MAX_TIMEOUT: Final = 86400.0
"""The longest timeout the stack takes, in seconds (a day): longer ones are mistakes."""

DEFAULT_MTU: Final = 65520
"""The largest 802.3 MTU rounded to 32-bit words, as passt uses: big frames cost nothing on
a reliable stream and save per-frame work."""
MIN_MTU: Final = 576
MAX_MTU: Final = 65521
"""MTU + 14 must fit the gvproxy framing's 16-bit length."""


@dataclass(frozen=True, slots=True)
class StackConfig:
    """Everything the sans-IO netstack needs to know; the shell builds it from the CLI."""

    subnet: IPv4Network = IPv4Network("192.168.127.0/24")
    """The link's subnet."""
    gateway_ip: IPv4Address = IPv4Address("192.168.127.1")
    """The parent's address on the link: default route, DNS server, ping target."""
    gateway_mac: MacAddress = field(default_factory=lambda: MacAddress.parse("5a:94:ef:e4:0c:dd"))
    """The MAC the stack answers ARP with and sends from."""
    enclave_ip: IPv4Address = IPv4Address("192.168.127.2")
    """The enclave's address (where exposed ports are forwarded)."""
    enclave_mac: MacAddress = field(default_factory=lambda: MacAddress.parse("5a:94:ef:e4:0c:ee"))
    """The enclave's MAC, used until ARP teaches us another."""
    host_alias_ip: IPv4Address = IPv4Address("192.168.127.254")
    """The address that stands for the parent's 127.0.0.1."""
    mtu: int = DEFAULT_MTU
    """The link MTU (IP packet size) in both directions."""
    dns_servers: tuple[IPv4Address, ...] = ()
    """Upstream resolvers (the parent's resolv.conf) that DNS queries to the gateway go to."""
    dns_port: int = 53
    """The upstream resolvers' port (always 53 in service; tests point it at a fake server)."""
    host_names: tuple[str, ...] = ("host.containers.internal", "host.docker.internal")
    """Names the gateway's DNS answers itself with `host_alias_ip`."""
    connect_timeout: float = 10.0
    """Seconds a host TCP connect may take before the enclave gets a RST."""
    dns_timeout: float = 3.0
    """Seconds to wait for an upstream resolver before trying the next (then SERVFAIL)."""
    udp_idle_timeout: float = 120.0
    """Seconds without traffic after which a UDP flow's host socket is closed."""
    ping_idle_timeout: float = 30.0
    """Seconds without traffic after which a ping flow's socket is closed."""
    max_tcp_flows: int = 16384
    """Concurrent TCP flows; SYNs beyond it get a RST (counted as `limit`)."""
    max_pending_connects: int = 1024
    """Host connects in flight at once; SYNs beyond it get a RST (counted as `limit`)."""
    max_udp_flows: int = 4096
    """Concurrent UDP and ping flows; datagrams beyond it are dropped (counted as `limit`)."""
    checksum_offload: bool = True
    """Agree when an agent offers checksum offload (see `StackOutput.checksum_offload`)."""
    segmentation_offload: bool = True
    """Agree when an agent offers TCP segmentation offload (`StackOutput.segment_size`)."""
    tcp_buffer: int = 4 << 20
    """Bytes per flow and direction the stack lets wait (receive window, send buffer)."""

    def __post_init__(self) -> None:
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"MTU {self.mtu} outside {MIN_MTU}..{MAX_MTU}")
        for name in ("gateway_ip", "enclave_ip", "host_alias_ip"):
            if getattr(self, name) not in self.subnet:
                raise ValueError(f"{name} {getattr(self, name)} is outside {self.subnet}")
        for name in ("connect_timeout", "dns_timeout", "udp_idle_timeout", "ping_idle_timeout"):
            if not 0 < getattr(self, name) <= MAX_TIMEOUT:  # a timer must be armable
                raise ValueError(
                    f"{name} {getattr(self, name)} is outside (0, {MAX_TIMEOUT:.0f}] s"
                )

    @property
    def local_ips(self) -> frozenset[IPv4Address]:
        """Addresses on the link that the stack itself owns."""
        return frozenset({self.gateway_ip, self.host_alias_ip})

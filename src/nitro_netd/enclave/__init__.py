"""The enclave agent: TAP device, interface configuration, frame pump and reconnect loop.

The agent never imports the netstack. It looks inside a frame only to mark enclave-bound
IPv4 TCP segments when checksum offload is on (a few header bytes, see `vnet`).
"""

from __future__ import annotations

from nitro_netd.enclave.agent import Agent, AgentConfig, AgentError, SessionOutcome
from nitro_netd.enclave.backoff import Backoff
from nitro_netd.enclave.handshake import Handshake, HandshakeResult, PeerKind
from nitro_netd.enclave.netconfig import InterfacePlan, NetConfigError, configure_interface
from nitro_netd.enclave.pump import PumpResult, run_pump
from nitro_netd.enclave.resolv import ResolvConfError, write_resolv_conf
from nitro_netd.enclave.setup import bring_up_network
from nitro_netd.enclave.tap import TapError, open_tap

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentError",
    "Backoff",
    "Handshake",
    "HandshakeResult",
    "InterfacePlan",
    "NetConfigError",
    "PeerKind",
    "PumpResult",
    "ResolvConfError",
    "SessionOutcome",
    "TapError",
    "bring_up_network",
    "configure_interface",
    "open_tap",
    "run_pump",
    "write_resolv_conf",
]

"""A local simulator for nitro-netd: network namespaces for an enclave, its parent and the
world, with the link as a unix socket in place of vsock (DESIGN.md §6).

Used by `nitro-netd demo`, `nitro-netd sim ...` and the end-to-end tests. Needs root and
`ip` (iproute2). All traffic stays inside the simulator's namespaces and loopback.
"""

from __future__ import annotations

from nitro_netd.sim.foreground import run_foreground
from nitro_netd.sim.host import HostUnfit, SimError, host_problem, require_host
from nitro_netd.sim.process import ManagedProcess
from nitro_netd.sim.signals import SimulatorInterrupted
from nitro_netd.sim.simulator import Simulator
from nitro_netd.sim.stale import cleanup_stale, describe, destroy
from nitro_netd.sim.state import Role, SimState, list_states, load_state
from nitro_netd.sim.topology import (
    ENCLAVE_ADDRESS,
    GATEWAY_ADDRESS,
    HOST_ALIAS_ADDRESS,
    PARENT_ADDRESS,
    WORLD_ADDRESS,
)

__all__ = [
    "ENCLAVE_ADDRESS",
    "GATEWAY_ADDRESS",
    "HOST_ALIAS_ADDRESS",
    "PARENT_ADDRESS",
    "WORLD_ADDRESS",
    "HostUnfit",
    "ManagedProcess",
    "Role",
    "SimError",
    "SimState",
    "Simulator",
    "SimulatorInterrupted",
    "cleanup_stale",
    "describe",
    "destroy",
    "host_problem",
    "list_states",
    "load_state",
    "require_host",
    "run_foreground",
]

"""Flow tables for the datagram protocols (UDP, ping): lookup, budget and idle expiry.

Theory of operation
-------------------
A datagram flow lives as long as traffic keeps it busy. The table keeps its flows in an
`OrderedDict` in order of last activity: touching a flow moves it to the end, so the
first entry is always the next to expire and both `next_expiry()` and expiry itself cost
O(1) per flow, however many flows there are. UDP and ping share one `FlowBudget`
(`StackConfig.max_udp_flows`), since every flow holds one host socket.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final, Generic, TypeVar

from nitro_netd.frames.errors import DropReason
from nitro_netd.frames.ipv4 import IpProto
from nitro_netd.frames.udp import build_udp
from nitro_netd.netstack.events import FlowId
from nitro_netd.netstack.output import StackOutput

logger = logging.getLogger(__name__)

UDP_OVERHEAD: Final = 28
"""IPv4 and UDP headers around a UDP payload."""


class FlowBudget:
    """How many datagram flows (host sockets) may exist at once, shared by UDP and ping."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._warned = False

    def try_take(self, what: str) -> bool:
        """Reserve one flow for `what`; False (logged once per episode) at the limit."""
        if self.used >= self.limit:
            if not self._warned:
                logger.warning(
                    "flow limit %d reached: dropping %s and later ones", self.limit, what
                )
                self._warned = True
            return False
        self._warned = False
        self.used += 1
        return True

    def give_back(self) -> None:
        """Release a flow reserved with `try_take()`."""
        self.used -= 1


@dataclass(slots=True)
class DatagramFlow:
    """What every datagram flow has: its id (for the host side) and its last activity."""

    id: FlowId
    last_active: float


K = TypeVar("K", bound=Hashable)
F = TypeVar("F", bound=DatagramFlow)


class IdleTable(Generic[K, F]):
    """Flows by key and by id, in order of last activity, with a shared budget."""

    def __init__(self, idle_timeout: float, budget: FlowBudget) -> None:
        self.idle_timeout = idle_timeout
        self.budget = budget
        self._by_key: dict[K, F] = {}
        self._by_id: OrderedDict[FlowId, tuple[K, F]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, key: K) -> F | None:
        """The flow for `key`, or None."""
        return self._by_key.get(key)

    def get_by_id(self, flow_id: FlowId) -> F | None:
        """The flow with id `flow_id`, or None."""
        entry = self._by_id.get(flow_id)
        return entry[1] if entry is not None else None

    def add(self, key: K, flow: F) -> None:
        """Insert a new flow (the caller took its budget) as the most recently active."""
        self._by_key[key] = flow
        self._by_id[flow.id] = (key, flow)

    def touch(self, flow: F, now: float) -> None:
        """Record activity on `flow`, pushing its expiry back."""
        flow.last_active = now
        self._by_id.move_to_end(flow.id)

    def remove(self, flow: F) -> None:
        """Forget `flow` and give its budget back (no-op if already gone)."""
        entry = self._by_id.pop(flow.id, None)
        if entry is not None:
            del self._by_key[entry[0]]
            self.budget.give_back()

    def next_expiry(self) -> float | None:
        """When the least recently active flow expires, or None with no flows."""
        for _key, flow in self._by_id.values():
            return flow.last_active + self.idle_timeout
        return None

    def pop_expired(self, now: float) -> list[F]:
        """Remove and return every flow idle for `idle_timeout` or more at `now`."""
        expired: list[F] = []
        while self._by_id:
            _key, flow = next(iter(self._by_id.values()))
            if flow.last_active + self.idle_timeout > now:
                break
            self.remove(flow)
            expired.append(flow)
        return expired

    def pop_all(self) -> list[F]:
        """Remove and return every flow."""
        flows = [flow for _key, flow in self._by_id.values()]
        for flow in flows:
            self.remove(flow)
        return flows


def send_udp(
    output: StackOutput,
    source: IPv4Address,
    source_port: int,
    destination_port: int,
    data: bytes,
) -> bool:
    """Queue a UDP datagram to the enclave; drop and count it if it exceeds the MTU.

    Returns:
        False if the datagram was too big for the link (counted as `limit`).
    """
    if len(data) + UDP_OVERHEAD > output.config.mtu:
        output.stats.count_drop(DropReason.LIMIT)
        return False
    destination = output.config.enclave_ip
    datagram = build_udp(source, destination, source_port, destination_port, data)
    output.send_ipv4(source, destination, IpProto.UDP, datagram)
    return True

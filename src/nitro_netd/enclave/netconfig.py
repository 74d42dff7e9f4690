"""Configure the TAP and loopback through netlink (pyroute2), never by running ``ip``.

Every step first reads the current state and changes only what differs, so running it
again on a configured interface is harmless. The MAC is set while the link is down: a TAP
refuses an address change while it is up.

IPv6 is turned off on the TAP (`disable_ipv6`, through ``/proc/sys``, before the link comes
up): the bridge carries IPv4 only, and the kernel's IPv6 link-local chatter (router and
neighbour solicitations, MLD reports) would only be dropped by the parent.

The default route through the gateway replaces any IPv4 default route already there. An
enclave has none (it has no NIC), but the agent may be started elsewhere (a test VM, a
namespace with its own uplink): `read_default_routes` notes the routes before the TAP
exists and `restore_default_routes` puts them back once it is gone (the kernel removes the
route through the TAP with it), unless someone set another default route meanwhile.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nitro_netd.link import DEFAULT_MTU

ENCLAVE_MAC: Final = "5a:94:ef:e4:0c:ee"
ENCLAVE_ADDRESS: Final = ipaddress.IPv4Interface("192.168.127.2/24")
GATEWAY: Final = ipaddress.IPv4Address("192.168.127.1")
NAMESERVER: Final = GATEWAY
TXQUEUELEN: Final = 10000
"""The TAP drops instead of pushing back: its queue is the only buffer (PERF-NOTES.md)."""
PROC_SYS: Final = "/proc/sys"
MAIN_TABLE: Final = 254
_SETTABLE_ROUTE_FLAGS: Final = 0x2 | 0x4
"""RTNH_F_PERVASIVE | RTNH_F_ONLINK: the route flags one may set (DEAD and LINKDOWN are
the kernel's, and refused when given)."""

logger = logging.getLogger("nitro_netd.enclave")


class NetConfigError(Exception):
    """The interface cannot be configured; the message says what to do."""


@dataclass(frozen=True, slots=True)
class InterfacePlan:
    """What the enclave's interface should look like."""

    name: str = "tap0"
    mac: str = ENCLAVE_MAC
    mtu: int = DEFAULT_MTU
    txqueuelen: int = TXQUEUELEN
    address: ipaddress.IPv4Interface = ENCLAVE_ADDRESS
    gateway: ipaddress.IPv4Address = GATEWAY


def configure_interface(plan: InterfacePlan) -> None:
    """Bring `plan.name` and ``lo`` up with the plan's MAC, MTU, address and default route.

    Raises:
        NetConfigError: the interface is missing or netlink refused a change.
    """
    try:
        with IPRoute() as ipr:
            index = _lookup(ipr, plan.name)
            _set_link(ipr, index, plan)
            _ensure_address(ipr, index, plan.address)
            _set_up(ipr, _lookup(ipr, "lo"))
            _ensure_default_route(ipr, index, plan.gateway)
    except NetlinkError as exc:
        raise NetConfigError(_describe(exc, plan.name)) from exc


def disable_ipv6(name: str, proc_sys: str = PROC_SYS) -> bool:
    """Turn IPv6 off on interface `name` (``net.ipv6.conf.NAME.disable_ipv6 = 1``) in this
    process's network namespace; return True if it is off.

    It never fails: a kernel without IPv6 has nothing to turn off (logged at debug), and a
    read-only ``/proc/sys`` (some containers) only costs the parent a few dropped frames
    (logged at info).
    """
    path = os.path.join(proc_sys, "net", "ipv6", "conf", name, "disable_ipv6")
    try:
        _write_sysctl(path, "1")
    except FileNotFoundError:
        logger.debug("no %s: no IPv6 on %s to turn off", path, name)
        return False
    except OSError as exc:
        logger.info(
            "cannot turn IPv6 off on %s (%s: %s): the parent drops its IPv6 packets",
            name,
            path,
            exc.strerror or exc,
        )
        return False
    return True


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(f"{value}\n")


def _lookup(ipr: Any, name: str) -> int:
    indexes = ipr.link_lookup(ifname=name)
    if not indexes:
        raise NetConfigError(f"interface {name} does not exist")
    return int(indexes[0])


def _set_link(ipr: Any, index: int, plan: InterfacePlan) -> None:
    """Set MAC (while down), MTU and queue length, then bring the link up."""
    link = ipr.link("get", index=index)[0]
    if str(link.get_attr("IFLA_ADDRESS")).lower() != plan.mac.lower():
        ipr.link("set", index=index, state="down")
        ipr.link("set", index=index, address=plan.mac)
    if link.get_attr("IFLA_MTU") != plan.mtu:
        ipr.link("set", index=index, mtu=plan.mtu)
    if link.get_attr("IFLA_TXQLEN") != plan.txqueuelen:
        ipr.link("set", index=index, txqlen=plan.txqueuelen)
    _set_up(ipr, index)


def _set_up(ipr: Any, index: int) -> None:
    ipr.link("set", index=index, state="up")


def _ensure_address(ipr: Any, index: int, address: ipaddress.IPv4Interface) -> None:
    present = {
        (msg.get_attr("IFA_ADDRESS"), msg["prefixlen"])
        for msg in ipr.get_addr(index=index, family=2)
    }
    if (str(address.ip), address.network.prefixlen) not in present:
        ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)


def _ensure_default_route(ipr: Any, index: int, gateway: ipaddress.IPv4Address) -> None:
    ipr.route("replace", dst="0.0.0.0/0", gateway=str(gateway), oif=index)


@dataclass(frozen=True, slots=True)
class DefaultRoute:
    """An IPv4 default route of the main table, as it was before the agent's own: enough
    to add it again as it was (type, flags such as onlink, preferred source, metric)."""

    gateway: str | None
    oif: int | None
    priority: int | None
    proto: int
    scope: int
    type: int = 1
    """RTN_UNICAST; others (blackhole, unreachable) have no gateway."""
    flags: int = 0
    prefsrc: str | None = None
    multipath: bool = False
    """A multipath route (RTA_MULTIPATH): not rebuilt by the agent."""

    def describe(self) -> str:
        """`via GATEWAY`, `dev #INDEX`, or both, for the log."""
        parts = [f"via {self.gateway}"] if self.gateway else []
        if self.oif is not None:
            parts.append(f"dev #{self.oif}")
        if self.priority:
            parts.append(f"metric {self.priority}")
        if self.multipath:
            parts.append("multipath")
        return " ".join(parts) or f"type {self.type}"


def read_default_routes() -> list[DefaultRoute]:
    """The IPv4 default routes of the main table, in this process's network namespace.

    Raises:
        NetConfigError: netlink refused to list them.
    """
    try:
        with IPRoute() as ipr:
            return [_default_route(msg) for msg in _main_defaults(ipr)]
    except (NetlinkError, OSError) as exc:
        raise NetConfigError(f"cannot read the default routes: {exc}") from exc


def restore_default_routes(previous: Sequence[DefaultRoute], gateway: ipaddress.IPv4Address) -> str:
    """Put back those of `previous` that are gone (the agent's own route, through the
    gateway, replaced one of them), after removing the agent's own if its TAP outlived it;
    unless a default route appeared that is neither ours nor one of `previous`: someone
    changed the routes meanwhile, and they are left alone. Return what was done, for the
    log.

    Raises:
        NetConfigError: netlink refused a change (each route is tried; all are named).
    """
    ours = str(gateway)
    failures: list[str] = []
    try:
        with IPRoute() as ipr:
            current = [_default_route(msg) for msg in _main_defaults(ipr)]
            foreign = [r for r in current if r.gateway != ours and r not in previous]
            if foreign:
                return "left the default routes as they are: they changed since the agent started"
            for route in current:
                if route.gateway == ours:  # the TAP outlived the agent (another holder)
                    _try(failures, f"remove ours {route.describe()}", ipr.route, "del",
                         dst="0.0.0.0/0", gateway=ours, table=MAIN_TABLE)  # fmt: skip
            missing = [route for route in previous if route not in current]
            for route in missing:
                _try(failures, f"restore {route.describe()}", ipr.route, "replace",
                     **_route_fields(route))  # fmt: skip
    except (NetlinkError, OSError) as exc:
        raise NetConfigError(f"cannot restore the default routes: {exc}") from exc
    if failures:
        raise NetConfigError("cannot " + "; cannot ".join(failures))
    if not missing:
        return "the default routes needed no restoring"
    return "restored the default route " + ", ".join(route.describe() for route in missing)


def _try(failures: list[str], what: str, call: Any, *args: Any, **kwargs: Any) -> None:
    """Run one netlink change; note a failure (a vanished route is no failure)."""
    try:
        call(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code != errno.ESRCH:
            failures.append(f"{what} ({exc})")


def _main_defaults(ipr: Any) -> list[Any]:
    return [
        msg
        for msg in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE)
        if msg["dst_len"] == 0 and msg.get_attr("RTA_TABLE", MAIN_TABLE) == MAIN_TABLE
    ]


def _default_route(msg: Any) -> DefaultRoute:
    return DefaultRoute(
        gateway=msg.get_attr("RTA_GATEWAY"),
        oif=msg.get_attr("RTA_OIF"),
        priority=msg.get_attr("RTA_PRIORITY"),
        proto=int(msg["proto"]),
        scope=int(msg["scope"]),
        type=int(msg["type"]),
        flags=int(msg["flags"]) & _SETTABLE_ROUTE_FLAGS,
        prefsrc=msg.get_attr("RTA_PREFSRC"),
        multipath=msg.get_attr("RTA_MULTIPATH") is not None,
    )


def _route_fields(route: DefaultRoute) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "dst": "0.0.0.0/0",
        "table": MAIN_TABLE,
        "proto": route.proto,
        "scope": route.scope,
        "type": route.type,
        "flags": route.flags,
    }
    optional = {"gateway": route.gateway, "oif": route.oif, "priority": route.priority,
                "prefsrc": route.prefsrc}  # fmt: skip
    fields.update({key: value for key, value in optional.items() if value is not None})
    return fields


def _describe(exc: NetlinkError, name: str) -> str:
    code = exc.code
    if code in (errno.EPERM, errno.EACCES):
        return f"configuring {name} needs root (CAP_NET_ADMIN): run as root"
    if code == errno.EINVAL:
        return f"the kernel rejected a setting for {name} (is the --mtu too large?)"
    return f"cannot configure {name}: {errno.errorcode.get(code, code)} {exc}"

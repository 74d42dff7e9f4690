"""The parent's own resolvers, read from its resolv.conf, for the gateway's DNS forwarder.

Only IPv4 `nameserver` lines are used (the forwarder's host sockets are IPv4); IPv6 ones
are skipped with a debug line. There is deliberately no fallback to a public resolver:
with no nameserver the gateway answers SERVFAIL and says so in the log.
"""

from __future__ import annotations

import dataclasses
import logging
from ipaddress import AddressValueError, IPv4Address
from typing import Final

from nitro_netd.netstack.config import StackConfig

logger = logging.getLogger(__name__)

DEFAULT_RESOLV_CONF: Final = "/etc/resolv.conf"


def parse_nameservers(text: str) -> tuple[IPv4Address, ...]:
    """Return the IPv4 `nameserver` addresses of a resolv.conf, in order, without repeats."""
    servers: list[IPv4Address] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = IPv4Address(fields[1])
        except AddressValueError:
            logger.debug("resolv.conf: nameserver %s skipped (not IPv4)", fields[1])
            continue
        if address not in servers:
            servers.append(address)
    return tuple(servers)


def read_nameservers(path: str = DEFAULT_RESOLV_CONF) -> tuple[IPv4Address, ...]:
    """Return the IPv4 nameservers in the file at `path`; () if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return parse_nameservers(file.read())
    except OSError as exc:
        logger.warning("cannot read %s: %s", path, exc)
        return ()


def with_parent_resolvers(config: StackConfig, path: str = DEFAULT_RESOLV_CONF) -> StackConfig:
    """Return `config` with `dns_servers` read from `path`, unless it already has some."""
    if config.dns_servers:
        return config
    servers = read_nameservers(path)
    if servers:
        logger.info("DNS: forwarding to %s", ", ".join(map(str, servers)))
    else:
        logger.warning("DNS: no IPv4 nameserver in %s: queries will get SERVFAIL", path)
    return dataclasses.replace(config, dns_servers=servers)

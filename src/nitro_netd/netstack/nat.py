"""Address translation between the enclave's view and the parent's, as pure functions.

The enclave sees one link, 192.168.127.0/24, and the world behind its gateway. Only one
address is rewritten: the host alias (192.168.127.254 by default) stands for the parent's
own 127.0.0.1, so `192.168.127.254:P` inside the enclave is `127.0.0.1:P` on the parent.
Every other destination outside the link is used as is. Named by direction, as in passt.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.netstack.config import StackConfig

LOOPBACK: Final = IPv4Address("127.0.0.1")
"""The parent's address that the host alias stands for."""
_UNSPECIFIED: Final = IPv4Address("0.0.0.0")
_BROADCAST: Final = IPv4Address("255.255.255.255")


def nat_from_enclave(config: StackConfig, destination: IPv4Address) -> IPv4Address:
    """Return the parent-side address for a packet the enclave sent to `destination`.

    The host alias becomes 127.0.0.1; the gateway is returned unchanged (the caller serves
    it itself: DNS, ping); any other address outside the link is returned unchanged.

    Raises:
        FrameError: `NOT_FOR_US` for other addresses on the link (the enclave itself, the
            subnet broadcast), and for multicast, broadcast, 0.0.0.0 and loopback
            destinations, which are never forwarded.
    """
    if destination == config.host_alias_ip:
        return LOOPBACK
    if destination == config.gateway_ip:
        return destination
    if destination in config.subnet:
        raise FrameError(DropReason.NOT_FOR_US, f"to {destination} on the link")
    if (
        destination.is_multicast
        or destination.is_loopback
        or destination in (_UNSPECIFIED, _BROADCAST)
    ):
        raise FrameError(DropReason.NOT_FOR_US, f"to {destination}, never forwarded")
    return destination


def nat_from_host(config: StackConfig, address: IPv4Address) -> IPv4Address:
    """Return the address the enclave should see for a peer at `address` on the parent.

    127.0.0.1 becomes the host alias; any other address is returned unchanged. This is
    the reverse of `nat_from_enclave()`.
    """
    if address == LOOPBACK:
        return config.host_alias_ip
    return address

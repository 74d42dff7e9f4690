"""Address translation between the enclave's view and the parent's."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.netstack import StackConfig
from nitro_netd.netstack.nat import nat_from_enclave, nat_from_host

CONFIG = StackConfig()
LOOPBACK = IPv4Address("127.0.0.1")


def test_nat_from_enclave_maps_the_host_alias_to_parent_loopback() -> None:
    assert nat_from_enclave(CONFIG, IPv4Address("192.168.127.254")) == LOOPBACK


@pytest.mark.parametrize("address", ["192.168.127.1", "198.18.0.2", "10.0.0.2", "169.254.169.254"])
def test_nat_from_enclave_keeps_the_gateway_and_the_world(address: str) -> None:
    assert nat_from_enclave(CONFIG, IPv4Address(address)) == IPv4Address(address)


@pytest.mark.parametrize(
    "address",
    [
        "192.168.127.2",
        "192.168.127.0",
        "192.168.127.99",
        "192.168.127.255",
        "255.255.255.255",
        "0.0.0.0",
        "127.0.0.1",
        "127.1.2.3",
        "224.0.0.251",
        "239.255.255.250",
    ],
)
def test_nat_from_enclave_refuses_link_broadcast_multicast_and_loopback(address: str) -> None:
    with pytest.raises(FrameError) as info:
        nat_from_enclave(CONFIG, IPv4Address(address))
    assert info.value.reason is DropReason.NOT_FOR_US


def test_nat_from_enclave_follows_a_custom_alias() -> None:
    config = StackConfig(host_alias_ip=IPv4Address("192.168.127.100"))
    assert nat_from_enclave(config, IPv4Address("192.168.127.100")) == LOOPBACK
    with pytest.raises(FrameError):
        nat_from_enclave(config, IPv4Address("192.168.127.254"))


def test_nat_from_host_reverses_loopback_and_keeps_the_rest() -> None:
    assert nat_from_host(CONFIG, LOOPBACK) == IPv4Address("192.168.127.254")
    assert nat_from_host(CONFIG, IPv4Address("198.18.0.2")) == IPv4Address("198.18.0.2")

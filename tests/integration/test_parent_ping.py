"""Ping through the in-process daemon's unprivileged ping sockets, on loopback only.

Whether ping sockets may be opened depends on `net.ipv4.ping_group_range`. Where they may,
a ping to the host alias must reach the parent's 127.0.0.1 through one. Where they may
not, the daemon warns once and still answers the alias itself; and, as root, the first
test is run again inside a private network namespace where the sysctl is set (it is per
namespace, so the machine's own setting is never touched).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from nitro_netd.frames.ethernet import EtherType, parse_ethernet
from nitro_netd.frames.icmp import IcmpType
from nitro_netd.frames.ipv4 import IpProto, parse_ipv4
from nitro_netd.netstack import StackConfig
from nitro_netd.parent.host_ping import PING_SYSCTL_HINT
from tests.support.fake_enclave import FakeEnclave
from tests.support.link_agent import LinkAgent, running_daemon

HOST_ALIAS = IPv4Address("192.168.127.254")
LOOPBACK = IPv4Address("127.0.0.1")
PING_GROUP_RANGE = Path("/proc/sys/net/ipv4/ping_group_range")
REPO = Path(__file__).resolve().parents[2]


def ping_sockets_allowed() -> bool:
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    except OSError:
        return False
    sock.close()
    return True


def is_icmp(frame: bytes) -> bool:
    header, payload = parse_ethernet(frame)
    return header.ethertype == EtherType.IPV4 and parse_ipv4(payload)[0].protocol == IpProto.ICMP


async def ping_alias(agent: LinkAgent, sequence: int) -> None:
    enclave = FakeEnclave()
    agent.send(enclave.ping(HOST_ALIAS, identifier=0x4A4A, sequence=sequence, data=b"x" * 56))
    source, message = enclave.parse_icmp_reply(await agent.receive_matching(is_icmp))
    assert source == HOST_ALIAS
    assert (message.type, message.identifier) == (IcmpType.ECHO_REPLY, 0x4A4A)
    assert (message.sequence, message.payload) == (sequence, b"x" * 56)


async def test_ping_ipv4_host_alias_reaches_parent_loopback_through_a_ping_socket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not ping_sockets_allowed():
        pytest.skip("net.ipv4.ping_group_range forbids ping sockets here (see the netns test)")
    caplog.set_level(logging.DEBUG, logger="nitro_netd.netstack.icmp")
    path = tmp_path / "link.sock"
    async with running_daemon(path, StackConfig(dns_servers=(LOOPBACK,))):
        agent = await LinkAgent.connect(path)
        for sequence in (1, 2, 3):
            await ping_alias(agent, sequence)
        agent.close()
    assert "[ping 192.168.127.2→192.168.127.254 id=19018] opened" in caplog.text
    assert PING_SYSCTL_HINT not in caplog.text


async def test_ping_ipv4_not_permitted_warns_once_and_answers_the_alias_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if ping_sockets_allowed():
        pytest.skip("ping sockets are allowed here: nothing is refused")
    caplog.set_level(logging.WARNING)
    path = tmp_path / "link.sock"
    async with running_daemon(path, StackConfig(dns_servers=(LOOPBACK,))):
        agent = await LinkAgent.connect(path)
        for sequence in (1, 2, 3):
            await ping_alias(agent, sequence)
        agent.close()
    assert caplog.text.count("net.ipv4.ping_group_range='0 2147483647'") == 1


def test_ping_ipv4_host_alias_in_a_private_network_namespace() -> None:
    if ping_sockets_allowed():
        pytest.skip("ping sockets are allowed here: the direct test ran instead")
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip to set ping_group_range in a private netns")
    machine_setting = PING_GROUP_RANGE.read_text()
    test = "tests/integration/test_parent_ping.py::" + (
        "test_ping_ipv4_host_alias_reaches_parent_loopback_through_a_ping_socket"
    )
    script = (
        "ip link set lo up && echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range"
        f" && exec {sys.executable} -m pytest -q -p no:cacheprovider {test}"
    )
    result = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert PING_GROUP_RANGE.read_text() == machine_setting  # the machine's own is untouched
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout

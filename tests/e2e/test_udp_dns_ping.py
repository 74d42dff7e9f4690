"""UDP, DNS and ping end to end: the enclave's kernel UDP and ICMP through agent and daemon to
servers in the world namespace and on the parent's loopback; the gateway's DNS server in
front of a dnsmasq standing in for the world's resolver; exposed UDP ports carried in."""

from __future__ import annotations

import json
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import pytest

from nitro_netd.sim import (
    GATEWAY_ADDRESS,
    HOST_ALIAS_ADDRESS,
    PARENT_ADDRESS,
    WORLD_ADDRESS,
    ManagedProcess,
    Simulator,
)

from .helpers import LINK_TIMEOUT, assert_exit, wait_for_log, wait_for_ping, wait_until

pytestmark = [pytest.mark.netns("ping", "dig", "dnsmasq", "getent", "ss"), pytest.mark.timeout(120)]

TOOL: Final = str(Path(__file__).with_name("udp_tool.py"))
ECHO_PORT: Final = 7000
DEFAULT_MTU: Final = 65520
IPV4_UDP_HEADERS: Final = 28
DNS_TIMEOUT: Final = 3.0
"""The daemon's wait for an upstream resolver before SERVFAIL (`StackConfig.dns_timeout`)."""
DIG: Final = ("dig", "+time=5", "+tries=2")
DIG_ONCE: Final = ("dig", f"+time={int(DNS_TIMEOUT) + 5}", "+tries=1")
"""One try that outlasts the daemon's DNS timeout: what comes back is the daemon's answer."""
BOTH_A: Final = "198.18.0.3"
BOTH_AAAA: Final = "2001:db8::3"
BIG_TXT: Final = ",".join([f"{n:03d}" + "x" * 197 for n in range(10)])
"""big.test's TXT strings: a 2 kB answer, more than a 1500-byte link carries."""


# --- setup -------------------------------------------------------------------------------


def start_bridge(sim: Simulator, parent_args: Sequence[str] = (), mtu: int | None = None) -> None:
    """Daemon and agent up (both at `mtu` if given), the link answering pings."""
    mtu_args = ["--mtu", str(mtu)] if mtu is not None else []
    sim.start_parent([*mtu_args, *parent_args])
    agent = sim.start_agent(mtu_args)
    wait_for_log(sim, agent, "link up", LINK_TIMEOUT)
    wait_for_ping(sim)


def start_echo(sim: Simulator, role: str, address: str, *ports: int) -> ManagedProcess:
    """The udp_tool echo server, bound once it returns."""
    argv = [sys.executable, TOOL, "server", address, *map(str, ports or (ECHO_PORT,))]
    server = sim.spawn("udp-echo", role, argv)
    wait_for_log(sim, server, '"listening"', LINK_TIMEOUT)
    return server


def tool(
    sim: Simulator, *args: object, role: str = "enclave", timeout: float = 60
) -> dict[str, Any]:
    """Run a udp_tool client command (in the enclave unless `role` says otherwise); it must
    report success."""
    result = sim.run(role, [sys.executable, TOOL, *map(str, args)], timeout=timeout)
    lines = result.stdout.strip().splitlines()
    assert lines, f"udp_tool {args} printed nothing: {result.stderr}\n{sim.logs_tail()}"
    outcome: dict[str, Any] = json.loads(lines[-1])
    context = f"udp_tool {args} in {role}: {outcome}\n{result.stderr}\n{sim.logs_tail()}"
    assert result.returncode == 0, context
    assert outcome.get("ok"), context
    return outcome


def read_json_line(sim: Simulator, popen: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The next JSON line a tool prints on its stdout pipe, within `timeout`."""
    assert popen.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(popen.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"no line from {popen.args!r} in {timeout:g} s\n{sim.logs_tail()}")
    line = popen.stdout.readline()
    assert line, f"{popen.args!r} ended (rc {popen.poll()}) without a line\n{sim.logs_tail()}"
    outcome: dict[str, Any] = json.loads(line)
    return outcome


def parent_udp_ports(sim: Simulator) -> set[int]:
    """Local ports of the UDP sockets in the parent namespace (the daemon's host sockets)."""
    result = sim.run("parent", ["ss", "-H", "-u", "-a", "-n"], timeout=10)
    assert result.returncode == 0, result.stderr
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in result.stdout.splitlines()}


def port_of(seen: str) -> int:
    """The port of a "HOST:PORT" the echo server reported."""
    return int(seen.rsplit(":", 1)[1])


def start_dnsmasq(sim: Simulator, address: str = WORLD_ADDRESS) -> ManagedProcess:
    """dnsmasq in the world as the resolver the parent's resolv.conf names; answering when
    this returns."""
    argv = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
        "--no-hosts", "--bind-interfaces", f"--listen-address={address}",
        f"--host-record=both.test,{BOTH_A},{BOTH_AAAA}", f"--txt-record=big.test,{BIG_TXT}",
        "--edns-packet-max=4096",
        f"--pid-file={sim.workdir / 'dnsmasq.pid'}", "--log-facility=-", "--log-queries",
    ]  # fmt: skip
    dnsmasq = sim.spawn("dnsmasq", "world", argv)

    def answers() -> bool:
        direct = sim.run(
            "world", ["dig", "+time=1", "+tries=1", "+short", f"@{address}", "both.test"]
        )
        return direct.stdout.strip() == BOTH_A

    wait_until(sim, answers, LINK_TIMEOUT, "dnsmasq answering in the world")
    return dnsmasq


@pytest.fixture
def bridge(sim: Simulator) -> Simulator:
    """Daemon and agent at the default MTU, a UDP echo server in the world."""
    start_bridge(sim)
    start_echo(sim, "world", WORLD_ADDRESS)
    return sim


@pytest.fixture
def dns(sim: Simulator) -> Simulator:
    """Daemon and agent, dnsmasq in the world answering both.test."""
    start_bridge(sim)
    start_dnsmasq(sim)
    return sim


def dig(sim: Simulator, *args: str, base: Sequence[str] = DIG) -> str:
    """dig in the enclave; its whole output (exit status 0 required)."""
    result = sim.run("enclave", [*base, *args], timeout=30)
    assert_exit(sim, result, 0, f"dig {' '.join(args)}")
    return result.stdout


def dig_status(output: str) -> str:
    """The RCODE from dig's `->>HEADER<<-` line."""
    found = re.search(r"status: (\w+)", output)
    assert found, f"no status line in dig's output:\n{output}"
    return found.group(1)


def answer_section(sim: Simulator, role: str, server: str, name: str, rtype: str) -> list[str]:
    """dig's answer lines for one question asked of `server` from `role`."""
    result = sim.run(role, [*DIG, "+noall", "+answer", f"@{server}", name, rtype], timeout=30)
    assert_exit(sim, result, 0, f"dig @{server} {name} {rtype} in {role}")
    return result.stdout.strip().splitlines()


# --- UDP out of the enclave --------------------------------------------------------------


def test_udp_ipv4_enclave_echo_round_trip_to_world(bridge: Simulator) -> None:
    outcome = tool(bridge, "echo", WORLD_ADDRESS, ECHO_PORT, 100, 20)
    assert outcome["matched"] == 20
    seen = tool(bridge, "whoami", WORLD_ADDRESS, ECHO_PORT)["seen"]
    assert seen.startswith(f"{PARENT_ADDRESS}:"), seen  # NATed to the parent's eth0


def test_udp_ipv4_200_enclave_sockets_at_once_all_answered_with_own_content(
    bridge: Simulator,
) -> None:
    outcome = tool(bridge, "many", WORLD_ADDRESS, ECHO_PORT, 200, 5)
    assert outcome["answered"] == 1000
    assert outcome["wrong"] == 0


def test_udp_ipv4_enclave_datagram_filling_default_mtu_round_trips(bridge: Simulator) -> None:
    size = DEFAULT_MTU - IPV4_UDP_HEADERS
    assert tool(bridge, "echo", WORLD_ADDRESS, ECHO_PORT, size, 3)["size"] == 65492
    start_echo(bridge, "parent", "127.0.0.1", ECHO_PORT + 1)
    tool(bridge, "echo", HOST_ALIAS_ADDRESS, ECHO_PORT + 1, size, 3)


def test_udp_ipv4_enclave_datagram_filling_mtu_1500_round_trips(sim: Simulator) -> None:
    start_bridge(sim, mtu=1500)
    start_echo(sim, "world", WORLD_ADDRESS)
    tool(sim, "echo", WORLD_ADDRESS, ECHO_PORT, 1500 - IPV4_UDP_HEADERS, 10)
    tool(sim, "many", WORLD_ADDRESS, ECHO_PORT, 20, 5)


def test_udp_ipv4_idle_flow_expires_while_busy_flow_keeps_working(sim: Simulator) -> None:
    idle_timeout = 2.0
    start_bridge(sim, ["--udp-timeout", str(idle_timeout)])
    start_echo(sim, "world", WORLD_ADDRESS)
    argv = [sys.executable, TOOL, "idle", WORLD_ADDRESS, str(ECHO_PORT)]
    client = sim.popen(
        "enclave", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True
    )
    first = read_json_line(sim, client, 15)
    idle_port, busy_port = port_of(first["idle"]), port_of(first["busy"])
    assert {idle_port, busy_port} <= parent_udp_ports(sim), first

    # The idle flow's host socket goes away after the idle time; the busy one stays.
    wait_until(
        sim,
        lambda: idle_port not in parent_udp_ports(sim),
        idle_timeout + 8,
        f"host socket of the idle flow (port {idle_port}) closed",
    )
    assert busy_port in parent_udp_ports(sim), "the busy flow's host socket must stay"

    assert client.stdin is not None
    client.stdin.write("go\n")
    client.stdin.flush()
    result = read_json_line(sim, client, 15)
    context = f"{result}\n{sim.logs_tail()}"
    assert result["ok"], context
    # Same enclave socket, new flow: the world sees a new source port.
    assert port_of(result["idle_after"]) != idle_port, context
    assert result["busy_seen"] == [first["busy"]], context
    assert result["busy_asks"] >= 5, context  # it kept talking through the expiry
    assert client.wait(10) == 0


def test_udp_ipv4_host_alias_reaches_echo_server_on_parent_loopback_only(
    bridge: Simulator,
) -> None:
    start_echo(bridge, "parent", "127.0.0.1", 7100)
    outcome = tool(bridge, "echo", HOST_ALIAS_ADDRESS, 7100, 512, 10)
    assert outcome["matched"] == 10
    seen = tool(bridge, "whoami", HOST_ALIAS_ADDRESS, 7100)["seen"]
    assert seen.startswith("127.0.0.1:"), seen


def test_udp_ipv4_closed_world_port_is_refused_in_enclave(bridge: Simulator) -> None:
    outcome = tool(bridge, "refused", WORLD_ADDRESS, 9)
    assert outcome["outcome"] == "ConnectionRefusedError"
    assert outcome["seconds"] < 5, outcome


# --- DNS at the gateway -------------------------------------------------------------------


def test_dns_enclave_resolv_conf_names_the_gateway(dns: Simulator) -> None:
    shown = dns.run("enclave", ["cat", "/etc/resolv.conf"]).stdout
    nameservers = re.findall(r"^nameserver\s+(\S+)", shown, re.MULTILINE)
    assert nameservers == [GATEWAY_ADDRESS], shown
    assert dns.etc_path("enclave", "resolv.conf").read_text() == shown


def test_dns_udp_gateway_relays_world_a_and_aaaa_unchanged(dns: Simulator) -> None:
    for rtype, expected in (("A", BOTH_A), ("AAAA", BOTH_AAAA)):
        via_gateway = answer_section(dns, "enclave", GATEWAY_ADDRESS, "both.test", rtype)
        direct = answer_section(dns, "world", WORLD_ADDRESS, "both.test", rtype)
        assert via_gateway == direct, (via_gateway, direct)
        assert len(via_gateway) == 1, via_gateway
        assert via_gateway[0].split()[-2:] == [rtype, expected], via_gateway
    full = dig(dns, f"@{GATEWAY_ADDRESS}", "both.test", "A")
    assert dig_status(full) == "NOERROR"
    assert f"SERVER: {GATEWAY_ADDRESS}#53({GATEWAY_ADDRESS}) (UDP)" in full, full


def test_dns_tcp_gateway_relays_world_a_and_aaaa_unchanged(dns: Simulator) -> None:
    for rtype, expected in (("A", BOTH_A), ("AAAA", BOTH_AAAA)):
        output = dig(dns, "+tcp", f"@{GATEWAY_ADDRESS}", "both.test", rtype)
        assert dig_status(output) == "NOERROR", output
        assert "(TCP)" in output, output
        answers = [line.split() for line in output.splitlines() if line.startswith("both.test.")]
        assert [answer[-2:] for answer in answers] == [[rtype, expected]], output
        direct = answer_section(dns, "world", WORLD_ADDRESS, "both.test", rtype)
        tcp_answers = dig(
            dns, "+tcp", "+noall", "+answer", f"@{GATEWAY_ADDRESS}", "both.test", rtype
        )
        assert tcp_answers.strip().splitlines() == direct


def test_dns_libc_lookups_in_enclave_resolve_world_names(dns: Simulator) -> None:
    hosts = dns.run("enclave", ["getent", "hosts", "both.test"])
    assert_exit(dns, hosts, 0, "getent hosts both.test")
    assert hosts.stdout.split()[0] in (BOTH_A, BOTH_AAAA), hosts.stdout
    assert "both.test" in hosts.stdout
    ahosts = dns.run("enclave", ["getent", "ahosts", "both.test"])
    assert_exit(dns, ahosts, 0, "getent ahosts both.test")
    # The agent turns IPv6 off on tap0 (the bridge carries IPv4 only): getaddrinfo with
    # AI_ADDRCONFIG, as `getent ahosts` calls it, leaves out the AAAA answer.
    assert {line.split()[0] for line in ahosts.stdout.splitlines()} == {BOTH_A}
    v4 = dns.run("enclave", ["getent", "ahostsv4", "both.test"])
    assert {line.split()[0] for line in v4.stdout.splitlines()} == {BOTH_A}, v4.stdout
    missing = dns.run("enclave", ["getent", "hosts", "no-such-name.invalid"])
    assert missing.returncode == 2, missing.stdout  # "not found", not an answer


@pytest.mark.parametrize("name", ["host.docker.internal", "host.containers.internal"])
def test_dns_host_names_resolve_to_host_alias(dns: Simulator, name: str) -> None:
    output = dig(dns, f"@{GATEWAY_ADDRESS}", name, "A")
    assert dig_status(output) == "NOERROR", output
    assert dig(dns, "+short", f"@{GATEWAY_ADDRESS}", name, "A").split() == [HOST_ALIAS_ADDRESS]
    aaaa = dig(dns, f"@{GATEWAY_ADDRESS}", name, "AAAA")
    assert dig_status(aaaa) == "NOERROR", aaaa  # the name exists...
    assert "ANSWER: 0," in aaaa, aaaa  # ...with no AAAA record
    for database in ("hosts", "ahosts"):
        result = dns.run("enclave", ["getent", database, name])
        assert_exit(dns, result, 0, f"getent {database} {name}")
        assert {line.split()[0] for line in result.stdout.splitlines()} == {HOST_ALIAS_ADDRESS}


def test_dns_world_resolver_down_gives_servfail_not_nxdomain(dns: Simulator) -> None:
    dnsmasq = next(p for p in dns.processes if p.name.startswith("dnsmasq"))
    dnsmasq.stop()
    output = dig(dns, f"@{GATEWAY_ADDRESS}", "both.test", "A", base=DIG_ONCE)
    assert dig_status(output) == "SERVFAIL", output
    # The gateway's own names do not depend on the world's resolver.
    assert dig(dns, "+short", f"@{GATEWAY_ADDRESS}", "host.docker.internal").split() == [
        HOST_ALIAS_ADDRESS
    ]


def test_dns_udp_answer_too_big_for_mtu_1500_is_retried_over_tcp(sim: Simulator) -> None:
    start_bridge(sim, mtu=1500)
    start_dnsmasq(sim)
    output = dig(sim, "+bufsize=4096", f"@{GATEWAY_ADDRESS}", "big.test", "TXT", base=DIG_ONCE)
    assert "Truncated, retrying in TCP mode" in output, output
    assert dig_status(output) == "NOERROR", output
    assert f"#53({GATEWAY_ADDRESS}) (TCP)" in output, output
    via_gateway = dig(
        sim, "+bufsize=4096", "+noall", "+answer", f"@{GATEWAY_ADDRESS}", "big.test", "TXT"
    )
    direct = answer_section(sim, "world", WORLD_ADDRESS, "big.test", "TXT")
    assert via_gateway.strip().splitlines() == direct
    assert len(direct) == 1, direct
    assert direct[0].count("x" * 197) == 10, direct


def test_dns_silent_world_resolver_gives_servfail_after_the_dns_timeout(sim: Simulator) -> None:
    start_bridge(sim)
    argv = [sys.executable, TOOL, "sink", WORLD_ADDRESS, "53"]
    sink = sim.spawn("dns-sink", "world", argv)
    wait_for_log(sim, sink, '"listening"', LINK_TIMEOUT)
    start = time.monotonic()
    output = dig(sim, f"@{GATEWAY_ADDRESS}", "both.test", "A", base=DIG_ONCE)
    took = time.monotonic() - start
    assert dig_status(output) == "SERVFAIL", output
    assert '"got"' in sink.log_text(), "the query must have reached the world's resolver"
    assert DNS_TIMEOUT - 0.5 < took < DNS_TIMEOUT + 4, f"SERVFAIL after {took:.1f} s"


# --- ping --------------------------------------------------------------------------------


@pytest.mark.parametrize("address", [WORLD_ADDRESS, HOST_ALIAS_ADDRESS])
def test_ping_ipv4_enclave_to_beyond_the_gateway(sim: Simulator, address: str) -> None:
    start_bridge(sim)
    result = sim.run("enclave", ["ping", "-c", "3", "-i", "0.2", "-W", "2", address])
    assert_exit(sim, result, 0, f"ping -c 3 {address}")
    assert " 0% packet loss" in result.stdout, result.stdout
    assert result.stdout.count(f"bytes from {address}: icmp_seq=") == 3, result.stdout


# --- exposed UDP ports -------------------------------------------------------------------


@pytest.fixture
def exposed(sim: Simulator) -> Simulator:
    """`--expose udp:5353:53 -e udp:6000`, an echo server on both ports in the enclave."""
    start_bridge(sim, ["--expose", "udp:5353:53", "-e", "udp:6000"])
    start_echo(sim, "enclave", "0.0.0.0", 53, 6000)
    return sim


def test_udp_ipv4_expose_world_client_gets_echo_via_parent_eth0(exposed: Simulator) -> None:
    outcome = tool(exposed, "echo", PARENT_ADDRESS, 5353, 1000, 10, role="world")
    assert outcome["matched"] == 10
    big = DEFAULT_MTU - IPV4_UDP_HEADERS
    tool(exposed, "echo", PARENT_ADDRESS, 5353, big, 2, role="world")


def test_udp_ipv4_expose_enclave_sees_world_client_real_address(exposed: Simulator) -> None:
    seen = tool(exposed, "whoami", PARENT_ADDRESS, 5353, role="world")["seen"]
    assert seen.startswith(f"{WORLD_ADDRESS}:"), seen


def test_udp_ipv4_expose_parent_loopback_client_appears_as_host_alias(exposed: Simulator) -> None:
    seen = tool(exposed, "whoami", "127.0.0.1", 6000, role="parent")["seen"]
    assert seen.startswith(f"{HOST_ALIAS_ADDRESS}:"), seen
    assert tool(exposed, "echo", "127.0.0.1", 6000, 300, 5, role="parent")["matched"] == 5


def test_udp_ipv4_expose_many_world_clients_at_once_get_their_own_replies(
    exposed: Simulator,
) -> None:
    outcome = tool(exposed, "many", PARENT_ADDRESS, 5353, 50, 5, role="world")
    assert outcome["answered"] == 250
    assert outcome["wrong"] == 0

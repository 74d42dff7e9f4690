"""Inbound TCP end to end: `--expose` ports on the parent carried into the enclave."""

from __future__ import annotations

import sys

import pytest

from nitro_netd.sim import Simulator

from .helpers import LINK_TIMEOUT, wait_for_log, wait_for_ping
from .test_tcp import client, start_server

pytestmark = [pytest.mark.netns(), pytest.mark.timeout(240)]

ENCLAVE = "192.168.127.2"
PARENT_ETH0 = "198.18.0.1"
MiB = 1 << 20


def start_exposed(sim: Simulator, *specs: str) -> None:
    args: list[str] = []
    for spec in specs:
        args += ["--expose", spec]
    sim.start_parent(args)
    agent = sim.start_agent()
    wait_for_log(sim, agent, "link up", LINK_TIMEOUT)
    wait_for_ping(sim)


def test_tcp_ipv4_expose_world_to_enclave_via_parent_eth0_checksummed(sim: Simulator) -> None:
    start_exposed(sim, "8080:80")
    start_server(sim, "enclave", "0.0.0.0", 80)
    client(sim, "up", PARENT_ETH0, 8080, 64 * MiB, role="world")
    client(sim, "down", PARENT_ETH0, 8080, 64 * MiB, role="world")
    client(sim, "mix", PARENT_ETH0, 8080, 100, 3, role="world")


def test_tcp_ipv4_expose_parent_loopback_to_enclave(sim: Simulator) -> None:
    start_exposed(sim, "9000")
    start_server(sim, "enclave", "0.0.0.0", 9000)
    client(sim, "up", "127.0.0.1", 9000, 16 * MiB, role="parent")
    client(sim, "downup", "127.0.0.1", 9000, 1 * MiB, role="parent")
    client(sim, "closefirst", "127.0.0.1", 9000, 1 * MiB, role="parent")


def test_tcp_ipv4_expose_enclave_sees_real_client_address(sim: Simulator) -> None:
    start_exposed(sim, "8081:81")
    script = (
        "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
        "s.bind(('0.0.0.0', 81)); s.listen(8); print('listening', flush=True)\n"
        "for _ in range(2):\n c, a = s.accept(); c.sendall(a[0].encode()); c.close()"
    )
    server = sim.spawn("peer-echo", "enclave", [sys.executable, "-c", script])
    wait_for_log(sim, server, "listening", LINK_TIMEOUT)
    fetch = "import socket, sys; s = socket.create_connection((sys.argv[1], 8081)); print(s.recv(100).decode())"
    world = sim.run("world", [sys.executable, "-c", fetch, PARENT_ETH0])
    assert world.stdout.strip() == "198.18.0.2", world.stderr + sim.logs_tail()
    local = sim.run("parent", [sys.executable, "-c", fetch, "127.0.0.1"])
    assert local.stdout.strip() == "192.168.127.254", local.stderr + sim.logs_tail()


def test_tcp_ipv4_expose_nothing_listening_in_enclave_resets_the_client(sim: Simulator) -> None:
    # The parent accepts before it can ask the enclave (as every userspace forwarder does),
    # so the enclave's refusal reaches the client as an immediate reset, not ECONNREFUSED.
    start_exposed(sim, "8082:82")
    assert client(sim, "rst", PARENT_ETH0, 8082, role="world")["error"] == "ECONNRESET"


def test_tcp_ipv4_expose_resets_in_both_directions(sim: Simulator) -> None:
    start_exposed(sim, "8083:83")
    start_server(sim, "enclave", "0.0.0.0", 83)
    assert client(sim, "rst", PARENT_ETH0, 8083, role="world")["error"] == "ECONNRESET"
    client(sim, "abort", PARENT_ETH0, 8083, role="world")
    client(sim, "up", PARENT_ETH0, 8083, 1000, role="world")


def test_tcp_ipv4_expose_port_in_use_fails_with_clear_error(sim: Simulator) -> None:
    blocker = sim.spawn(
        "blocker",
        "parent",
        [
            sys.executable,
            "-c",
            "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 8084)); s.listen(); print('bound', flush=True); time.sleep(120)",
        ],
    )
    wait_for_log(sim, blocker, "bound", LINK_TIMEOUT)
    result = sim.run("parent", sim.parent_argv(["--expose", "8084:84"]), timeout=30)
    assert result.returncode != 0
    assert "cannot expose tcp port 8084" in result.stderr
    assert "Traceback" not in result.stderr
    assert not sim.link_path.exists(), "the link socket must not be left behind"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0", "between 1 and 65535"),
        ("80:70000", "between 1 and 65535"),
        ("http", "not a port"),
        ("80-70:1", "backwards"),
    ],
)
def test_tcp_ipv4_expose_bad_spec_is_rejected_naming_it(
    sim: Simulator, spec: str, message: str
) -> None:
    result = sim.run("parent", sim.parent_argv(["--expose", spec]), timeout=30)
    assert result.returncode == 2
    assert spec in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_tcp_ipv4_expose_duplicate_port_is_rejected(sim: Simulator) -> None:
    result = sim.run("parent", sim.parent_argv(["-e", "8085:85", "-e", "8085:86"]), timeout=30)
    assert result.returncode == 2
    assert "already exposed" in result.stderr

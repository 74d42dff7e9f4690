"""Outbound TCP end to end: the enclave's kernel TCP, through agent and daemon, to servers in
the world namespace and on the parent's loopback. Every transfer is checksummed."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from nitro_netd.sim import ManagedProcess, Simulator

from .helpers import LINK_TIMEOUT, wait_for_log, wait_for_ping

pytestmark = [pytest.mark.netns(), pytest.mark.timeout(240)]

TOOL = str(Path(__file__).with_name("tcp_tool.py"))
WORLD = "198.18.0.2"
PORT = 7000
MiB = 1 << 20


@pytest.fixture
def bridge(sim: Simulator) -> Simulator:
    """A simulator with the daemon, the agent and the TCP test server in the world."""
    start_bridge(sim)
    return sim


def start_bridge(sim: Simulator, parent_args: tuple[str, ...] = ()) -> None:
    sim.start_parent(parent_args)
    agent = sim.start_agent()
    wait_for_log(sim, agent, "link up", LINK_TIMEOUT)
    wait_for_ping(sim)
    start_server(sim, "world", WORLD)


def start_server(sim: Simulator, role: str, address: str, port: int = PORT) -> ManagedProcess:
    server = sim.spawn("tcp-server", role, [sys.executable, TOOL, "server", address, str(port)])
    wait_for_log(sim, server, '"listening"', LINK_TIMEOUT)
    return server


def client(
    sim: Simulator, *args: object, timeout: float = 180, role: str = "enclave"
) -> dict[str, Any]:
    """Run a tcp_tool client command (in the enclave unless `role` says otherwise)."""
    argv = [sys.executable, TOOL, *map(str, args)]
    result = sim.run(role, argv, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    assert lines, f"client {args} printed nothing: {result.stderr}\n{sim.logs_tail()}"
    outcome: dict[str, Any] = json.loads(lines[-1])
    context = f"client {args}: {outcome}\n{result.stderr}\n{sim.logs_tail()}"
    assert result.returncode == 0, context
    assert outcome.get("ok"), context
    return outcome


def test_tcp_ipv4_enclave_uploads_256_mib_intact(bridge: Simulator) -> None:
    outcome = client(bridge, "up", WORLD, PORT, 256 * MiB)
    assert outcome["bytes"] == 256 * MiB


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "copied"])
def test_tcp_ipv4_enclave_downloads_256_mib_intact(
    sim: Simulator, tmp_path: Path, splice: bool
) -> None:
    """By default the daemon splices a bulk download's bytes into the link (status counts
    them); with --splice-flows 0 it copies them. Either way every byte arrives, once, in
    order."""
    start_bridge(sim, ("--state-dir", str(tmp_path), *(() if splice else ("--splice-flows", "0"))))
    outcome = client(sim, "down", WORLD, PORT, 256 * MiB)
    assert outcome["bytes"] == 256 * MiB
    spliced = daemon_status(sim, tmp_path)["splice"]
    assert spliced["enabled"] is splice
    assert spliced["bytes"] > 200 * MiB if splice else spliced["bytes"] == 0


@pytest.mark.parametrize("limit", [None, 1], ids=["default", "limit-1"])
def test_tcp_ipv4_two_downloads_at_once_arrive_intact(
    sim: Simulator, tmp_path: Path, limit: int | None
) -> None:
    """By default two downloads at once both splice. With --splice-flows 1 the one that
    began splicing goes back to copying (status counts it). Either way neither loses,
    repeats or reorders a byte."""
    flags = () if limit is None else ("--splice-flows", str(limit))
    start_bridge(sim, ("--state-dir", str(tmp_path), *flags))
    outcome = client(sim, "downs", WORLD, PORT, 256 * MiB, 2)
    assert outcome["downloads"] == 2
    spliced = daemon_status(sim, tmp_path)["splice"]
    if limit is None:
        assert (spliced["flows"], spliced["stopped"]) == (2, 0)
        assert spliced["bytes"] > 400 * MiB
    else:
        assert spliced["flows"] >= 1
        assert spliced["stopped"] >= 1


def test_tcp_ipv4_sixteen_downloads_at_once_all_splice_and_arrive_intact(
    sim: Simulator, tmp_path: Path
) -> None:
    """Every bulk flow splices by default: sixteen downloads at once share the link's
    writer pipe and each its own pipes, and none loses, repeats or reorders a byte."""
    start_bridge(sim, ("--state-dir", str(tmp_path)))
    outcome = client(sim, "downs", WORLD, PORT, 32 * MiB, 16)
    assert outcome["downloads"] == 16
    spliced = daemon_status(sim, tmp_path)["splice"]
    assert (spliced["flows"], spliced["stopped"]) == (16, 0)
    assert spliced["bytes"] > 16 * 24 * MiB


def daemon_status(sim: Simulator, state_dir: Path) -> dict[str, Any]:
    """The daemon's `status --json` (it was started with --state-dir `state_dir`)."""
    argv = [sys.executable, "-m", "nitro_netd.cli.status", "--state-dir", str(state_dir), "--json"]
    result = sim.run("parent", argv, timeout=30)
    assert result.returncode == 0, f"status: {result.stderr}\n{sim.logs_tail()}"
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def test_tcp_ipv4_200_concurrent_connections_random_sizes_and_half_closes(
    bridge: Simulator,
) -> None:
    outcome = client(bridge, "mix", WORLD, PORT, 200, 7)
    assert outcome["connections"] == 200


def test_tcp_ipv4_server_that_speaks_first(bridge: Simulator) -> None:
    assert client(bridge, "banner", WORLD, PORT)["banner"].startswith("220 ")


def test_tcp_ipv4_server_that_closes_first(bridge: Simulator) -> None:
    client(bridge, "closefirst", WORLD, PORT, 3 * MiB)


def test_tcp_ipv4_world_half_close_keeps_enclave_direction_open(bridge: Simulator) -> None:
    client(bridge, "downup", WORLD, PORT, 2 * MiB)


def test_tcp_ipv4_enclave_half_close_keeps_world_direction_open(bridge: Simulator) -> None:
    client(bridge, "up", WORLD, PORT, 5 * MiB)  # SHUT_WR first, then the answer comes back


def test_tcp_ipv4_world_reset_reaches_enclave_as_reset(bridge: Simulator) -> None:
    assert client(bridge, "rst", WORLD, PORT)["error"] == "ECONNRESET"


def test_tcp_ipv4_enclave_reset_reaches_world_as_reset(bridge: Simulator) -> None:
    catcher = start_server(bridge, "world", WORLD, PORT + 1)
    client(bridge, "abort", WORLD, PORT + 1)
    # The server's UP handler ends quietly on ECONNRESET; prove the daemon dropped the flow
    # by reusing the world server: a fresh connection to it must work at once.
    client(bridge, "up", WORLD, PORT + 1, 1000)
    assert catcher.is_alive()


def test_tcp_ipv4_connect_to_closed_port_is_refused_at_once(bridge: Simulator) -> None:
    outcome = client(bridge, "refused", WORLD, 9)
    assert "ConnectionRefusedError" in outcome["error"]
    assert outcome["seconds"] < 5


def test_tcp_ipv4_blackholed_connects_do_not_delay_a_live_transfer(sim: Simulator) -> None:
    start_bridge(sim, ("--connect-timeout", "4"))
    result = sim.run("world", ["ip", "route", "add", "blackhole", "198.18.99.0/24"])
    assert result.returncode == 0, result.stderr
    outcome = client(sim, "blackhole", "198.18.99.1", PORT, WORLD, 50, 64 * MiB, 30)
    assert outcome["dead_still_pending_at_transfer_end"] == 50, outcome
    assert outcome["dead_results"] == ["OSError"], outcome  # EHOSTUNREACH from our ICMP
    assert outcome["dead_max_seconds"] < 15, outcome


def test_tcp_ipv4_slow_world_reader_slows_enclave_writer_and_loses_nothing(
    bridge: Simulator,
) -> None:
    client(bridge, "slowread", WORLD, PORT, 24 * MiB)


def test_tcp_ipv4_slow_enclave_reader_slows_world_writer_and_loses_nothing(
    bridge: Simulator,
) -> None:
    client(bridge, "slowdown", WORLD, PORT, 24 * MiB)


def test_tcp_ipv4_host_alias_reaches_server_on_parent_loopback_only(bridge: Simulator) -> None:
    start_server(bridge, "parent", "127.0.0.1", 7100)
    client(bridge, "up", "192.168.127.254", 7100, 8 * MiB)
    client(bridge, "down", "192.168.127.254", 7100, 8 * MiB)


@pytest.mark.parametrize("mtu", [1500, 9001])
def test_tcp_ipv4_transfers_at_smaller_mtus(sim: Simulator, mtu: int) -> None:
    sim.start_parent(("--mtu", str(mtu)))
    agent = sim.start_agent(("--mtu", str(mtu)))
    wait_for_log(sim, agent, "link up", LINK_TIMEOUT)
    wait_for_ping(sim)
    start_server(sim, "world", WORLD)
    client(sim, "up", WORLD, PORT, 32 * MiB)
    client(sim, "down", WORLD, PORT, 32 * MiB)


ETHERNET_MTU_FRAME = 1500 + 14


def link_counters(sim: Simulator, state_dir: Path, name: str) -> dict[str, int]:
    """The daemon's exact link counters (`nitro-netd status NAME --json`)."""
    argv = [sys.executable, "-m", "nitro_netd.cli.status", "--state-dir", str(state_dir)]
    result = sim.run("parent", [*argv, name, "--json"], timeout=30)
    assert result.returncode == 0, f"nitro-netd status: {result.stderr}\n{sim.logs_tail()}"
    counters: dict[str, int] = json.loads(result.stdout)["counters"]
    return counters


def mean_frame(before: dict[str, int], after: dict[str, int], direction: str) -> float:
    """The mean size of the link frames in `direction` ("in": from the enclave) between."""
    frames = after[f"frames_{direction}"] - before[f"frames_{direction}"]
    return (after[f"bytes_{direction}"] - before[f"bytes_{direction}"]) / frames


@pytest.mark.parametrize(
    ("agent_args", "tso"), [((), True), (("--no-tso",), False)], ids=["tso", "no-tso"]
)
def test_tcp_ipv4_segmentation_offload_at_mtu_1500(
    sim: Simulator, agent_args: tuple[str, ...], tso: bool
) -> None:
    """At MTU 1500 the agent and the daemon agree TCP segmentation offload (unless the agent
    runs with --no-tso): super-segments far larger than the MTU then cross the link both
    ways, and 64 MiB each way still arrive intact."""
    state_dir, name = sim.workdir / "state", "tso"
    parent = sim.start_parent(
        ("--mtu", "1500", "--enclave-name", name, "--state-dir", str(state_dir))
    )
    agent = sim.start_agent(("--mtu", "1500", *agent_args))
    state = "on" if tso else "off"
    wait_for_log(sim, agent, f"checksum offload on, segmentation offload {state}", LINK_TIMEOUT)
    wait_for_log(sim, parent, f"checksum offload on, segmentation offload {state})", LINK_TIMEOUT)
    wait_for_ping(sim)
    start_server(sim, "world", WORLD)
    before = link_counters(sim, state_dir, name)
    assert client(sim, "up", WORLD, PORT, 64 * MiB)["bytes"] == 64 * MiB
    middle = link_counters(sim, state_dir, name)
    assert client(sim, "down", WORLD, PORT, 64 * MiB)["bytes"] == 64 * MiB
    after = link_counters(sim, state_dir, name)
    upload, download = mean_frame(before, middle, "in"), mean_frame(middle, after, "out")
    if tso:
        assert min(upload, download) > 4 * ETHERNET_MTU_FRAME, (upload, download)
    else:
        assert max(upload, download) <= ETHERNET_MTU_FRAME, (upload, download)


@pytest.mark.netns("curl")
def test_tcp_ipv4_curl_in_enclave_downloads_from_world_http_server(bridge: Simulator) -> None:
    root = bridge.workdir / "www"
    root.mkdir()
    data = os.urandom(40 * MiB)
    (root / "blob.bin").write_bytes(data)
    argv = [sys.executable, "-m", "http.server", "8000", "--bind", WORLD, "--directory", str(root)]
    server = bridge.spawn("http", "world", argv)
    wait_for_log(bridge, server, "Serving HTTP", LINK_TIMEOUT)
    target = bridge.workdir / "got.bin"
    result = bridge.run(
        "enclave", ["curl", "-sS", "-o", str(target), f"http://{WORLD}:8000/blob.bin"]
    )
    assert result.returncode == 0, result.stderr + bridge.logs_tail()
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()

"""The daemon's lifecycle end to end: start orders, --daemonize, status, nitro-cli following.

The daemon runs with `--daemonize`, its state under the simulator's work dir; it leaves the
launching process's session, so the `daemons` fixture stops every one it started (by the
pid in its pidfile, checked against its command line) whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nitro_netd.parent.lifecycle import read_pid
from nitro_netd.sim import Simulator
from nitro_netd.sim.host import is_running

from .helpers import LINK_TIMEOUT, assert_exit, wait_for_log, wait_until

pytestmark = [pytest.mark.netns(), pytest.mark.timeout(180)]

TOOL = str(Path(__file__).with_name("lifecycle_tool.py"))
WORLD = "198.18.0.2"
PARENT_ETH0 = "198.18.0.1"
ECHO_PORT = 7100
FIRST_ECHO_LIMIT = 20.0
REACH_WITHIN = 2.0
"""New connections must work this soon after both sides are up (the agent's backoff cap)."""
SLACK = 1.0
"""Allowance for process start-up and a loaded CI machine on top of REACH_WITHIN."""
NAME = "app"


class Daemons:
    """Starts daemonized nitro-netd-parents in a simulator and stops them all at the end."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.state_dir = sim.workdir / "state"
        self.started: list[int] = []

    def start(self, *extra: str, name: str = NAME) -> int:
        """`nitro-netd-parent --daemonize`; return its pid (asserting it started)."""
        result = self.launch(*extra, name=name)
        assert_exit(self.sim, result, 0, "nitro-netd-parent --daemonize")
        pid = read_pid(self.pidfile(name))
        assert pid is not None, "no pidfile once --daemonize returned"
        self.started.append(pid)
        return pid

    def launch(self, *extra: str, name: str = NAME) -> Any:
        argv = self.sim.parent_argv(
            ["--daemonize", "--enclave-name", name, "--state-dir", str(self.state_dir), *extra]
        )
        return self.sim.run("parent", argv, timeout=60)

    def pidfile(self, name: str = NAME) -> Path:
        return self.state_dir / name / "parent.pid"

    def control(self, name: str = NAME) -> Path:
        return self.state_dir / name / "control.sock"

    def status(self, name: str = NAME) -> dict[str, Any]:
        """`nitro-netd status NAME --json`."""
        result = self.status_command(name, "--json")
        assert_exit(self.sim, result, 0, "nitro-netd status --json")
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def status_command(self, *args: str) -> Any:
        argv = [sys.executable, "-m", "nitro_netd.cli.status", "--state-dir", str(self.state_dir)]
        return self.sim.run("parent", [*argv, *args], timeout=30)

    def stop(self, pid: int, timeout: float = 10.0) -> None:
        """SIGTERM one daemon and wait until it is gone."""
        if self._ours(pid):
            os.kill(pid, signal.SIGTERM)
        wait_until(self.sim, lambda: not is_running(pid), timeout, f"daemon {pid} exits on SIGTERM")

    def stop_all(self) -> None:
        for pid in self.started:
            if self._ours(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in self.started:
            while is_running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._ours(pid):
                os.kill(pid, signal.SIGKILL)

    def _ours(self, pid: int) -> bool:
        """The pid is still a daemon of ours (not a reused pid)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.state_dir).encode() in cmdline and is_running(pid)


@pytest.fixture
def daemons(sim: Simulator) -> Iterator[Daemons]:
    handle = Daemons(sim)
    try:
        yield handle
    finally:
        handle.stop_all()


def start_echo_server(sim: Simulator) -> None:
    server = sim.spawn("echo", "world", [sys.executable, TOOL, "echo", WORLD, str(ECHO_PORT)])
    wait_for_log(sim, server, "listening", LINK_TIMEOUT)


def first_echo_seconds(sim: Simulator) -> float:
    """Seconds until a fresh TCP connection from the enclave to the world echoes."""
    argv = [sys.executable, TOOL, "first-echo", WORLD, str(ECHO_PORT), str(FIRST_ECHO_LIMIT)]
    result = sim.run("enclave", argv, timeout=FIRST_ECHO_LIMIT + 30)
    outcome: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["ok"], f"no TCP connection from the enclave: {outcome}\n{sim.logs_tail()}"
    return float(outcome["seconds"])


def assert_reached_soon(sim: Simulator, seconds: float, what: str) -> None:
    print(f"{what}: first TCP connection after {seconds:.2f} s")  # shown with -s
    assert seconds <= REACH_WITHIN + SLACK, (
        f"{what}: first TCP connection after {seconds:.2f} s\n{sim.logs_tail()}"
    )


def test_agent_first_then_daemon_10_s_later_connections_work_within_2_s(
    sim: Simulator, daemons: Daemons
) -> None:
    start_echo_server(sim)
    agent = sim.start_agent()
    # The wait is the scenario (an agent alone for 10 s), not synchronisation.
    alone_until = time.monotonic() + 10.0
    while time.monotonic() < alone_until:
        assert agent.is_alive(), "the agent gave up without a parent\n" + sim.logs_tail()
        time.sleep(0.2)

    daemons.start()

    assert_reached_soon(sim, first_echo_seconds(sim), "daemon started 10 s after the agent")


def test_daemon_first_then_agent_connections_work_within_2_s(
    sim: Simulator, daemons: Daemons
) -> None:
    start_echo_server(sim)
    daemons.start()

    sim.start_agent()

    # Measured from just after the agent started (the client starts right behind it).
    assert_reached_soon(sim, first_echo_seconds(sim), "agent started after the daemon")


def test_daemon_restarted_while_agent_runs_connections_work_within_2_s(
    sim: Simulator, daemons: Daemons
) -> None:
    start_echo_server(sim)
    pid = daemons.start()
    agent = sim.start_agent()
    wait_for_log(sim, agent, "link up", LINK_TIMEOUT)
    first_echo_seconds(sim)
    mark = agent.log_mark()

    daemons.stop(pid)
    assert not daemons.pidfile().exists(), "pidfile left behind after SIGTERM"
    assert not daemons.control().exists(), "control socket left behind after SIGTERM"
    assert not sim.link_path.exists(), "link socket left behind after SIGTERM"
    daemons.start()

    assert_reached_soon(sim, first_echo_seconds(sim), "daemon restarted under a running agent")
    wait_for_log(sim, agent, "link up", LINK_TIMEOUT, after=mark)
    assert agent.is_alive()


def test_daemonize_with_expose_is_ready_on_return(sim: Simulator, daemons: Daemons) -> None:
    daemons.start("--expose", "8090:90")

    # No wait: the port is bound and the status answers the moment --daemonize returned.
    # With no enclave link yet the daemon resets the client: a reset (not a refusal) proves
    # the listener is there.
    probe = (
        "import socket, sys\n"
        "try: socket.create_connection((sys.argv[1], 8090), timeout=5).close()\n"
        "except ConnectionResetError: pass\n"
        "print('bound')"
    )
    reached = sim.run("world", [sys.executable, "-c", probe, PARENT_ETH0])
    assert_exit(sim, reached, 0, "connect to the exposed port right after --daemonize")
    status = daemons.status()
    assert status["exposed"] == [{"protocol": "tcp", "parent_port": 8090, "enclave_port": 90}]
    assert status["link"]["up"] is False

    server = sim.spawn("echo", "enclave", [sys.executable, TOOL, "echo", "0.0.0.0", "90"])
    agent = sim.start_agent()
    wait_for_log(sim, agent, "link up", LINK_TIMEOUT)
    wait_for_log(sim, server, "listening", LINK_TIMEOUT)
    argv = [sys.executable, TOOL, "first-echo", PARENT_ETH0, "8090", str(FIRST_ECHO_LIMIT)]
    assert_exit(sim, sim.run("world", argv, timeout=60), 0, "echo through the exposed port")


def test_daemonize_port_in_use_fails_with_one_line_and_leaves_nothing(
    sim: Simulator, daemons: Daemons
) -> None:
    daemons.start("--expose", "8091:91", name="first")

    result = daemons.launch("--expose", "8091:91", "--listen", f"unix://{sim.workdir}/b.sock")

    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "nitro-netd-parent: error: cannot expose tcp port 8091: Address already in use"
        " (something else listens there: see ss -lnp 'sport = :8091'; stop it or expose"
        " another parent port)"
    ]
    assert not (daemons.state_dir / NAME).exists(), "state left behind by the failed start"
    assert not (sim.workdir / "b.sock").exists()


def test_second_daemon_for_the_same_name_is_refused_naming_the_pid(
    sim: Simulator, daemons: Daemons
) -> None:
    pid = daemons.start()

    result = daemons.launch("--listen", f"unix://{sim.workdir}/other.sock")

    assert result.returncode == 1
    assert f"already running (pid {pid}" in result.stderr
    assert daemons.status()["pid"] == pid


def test_exit_with_enclave_follows_fake_nitro_cli(sim: Simulator, daemons: Daemons) -> None:
    enclaves = sim.workdir / "enclaves.json"
    enclaves.write_text(json.dumps([{"EnclaveName": NAME, "EnclaveCID": 16, "State": "RUNNING"}]))
    fake = sim.workdir / "nitro-cli"
    fake.write_text(f'#!/bin/sh\n[ "$1" = describe-enclaves ] && exec cat {enclaves}\nexit 2\n')
    fake.chmod(0o755)
    pid = daemons.start("--nitro-cli", str(fake), "--enclave-poll", "0.2", "--exit-with-enclave")
    status = daemons.status()
    assert status["enclave"] == {
        "name": NAME, "following": True, "nitro_cli": str(fake), "cid": 16, "state": "RUNNING",
        "error": None,
    }  # fmt: skip

    # An agent on a unix link (no CID) is not pinned; the restart of the enclave (new CID)
    # keeps the daemon running.
    agent = sim.start_agent()
    wait_for_log(sim, agent, "link up", LINK_TIMEOUT)
    enclaves.write_text(json.dumps([{"EnclaveName": NAME, "EnclaveCID": 17, "State": "RUNNING"}]))
    wait_until(sim, lambda: daemons.status()["enclave"]["cid"] == 17, 10, "new CID followed")

    enclaves.write_text("[]")

    wait_until(sim, lambda: not is_running(pid), 10, "daemon exits once the enclave is gone")
    assert not daemons.pidfile().exists()
    assert not daemons.control().exists()
    assert not sim.link_path.exists()
    log = (daemons.state_dir / NAME / "parent.log").read_text()
    assert "enclave app is gone" in log
    assert "Traceback" not in log


def test_status_shows_link_flows_and_counters(sim: Simulator, daemons: Daemons) -> None:
    start_echo_server(sim)
    daemons.start()
    agent = sim.start_agent()
    wait_for_log(sim, agent, "link up", LINK_TIMEOUT)
    held = sim.spawn("hold", "enclave", [sys.executable, TOOL, "hold", WORLD, str(ECHO_PORT)])
    wait_for_log(sim, held, "held", LINK_TIMEOUT)

    status = daemons.status()

    assert status["link"]["up"] is True
    assert status["link"]["peer"] == "unix peer"
    assert status["link"]["cid"] is None
    assert status["flows"]["tcp"] >= 1
    assert status["counters"]["frames_in"] > 0
    assert status["counters"]["bytes_out"] > 0
    table = daemons.status_command(NAME)
    assert_exit(sim, table, 0, "nitro-netd status")
    assert "link          up for" in table.stdout
    assert "  tcp " in table.stdout


def test_status_without_a_daemon_says_so(sim: Simulator, daemons: Daemons) -> None:
    result = daemons.status_command("nobody")

    assert result.returncode == 1
    assert "no nitro-netd-parent is running for 'nobody'" in result.stderr
    assert "Traceback" not in result.stderr

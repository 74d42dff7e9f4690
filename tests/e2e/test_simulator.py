"""The simulator itself: its topology, and that it always leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nitro_netd.sim import (
    PARENT_ADDRESS,
    WORLD_ADDRESS,
    SimState,
    Simulator,
    cleanup_stale,
    load_state,
)
from nitro_netd.sim.host import is_alive, list_netns, netns_pids, process_start_time

from .helpers import wait_until

pytestmark = [pytest.mark.netns("ping"), pytest.mark.timeout(60)]

Pid = tuple[int, int | None]
"""A process named for good: pid and start time."""


def _pids_in(sim: Simulator) -> list[Pid]:
    pids = [pid for netns in sim.namespaces.values() for pid in netns_pids(netns)]
    return [(pid, process_start_time(pid)) for pid in pids]


def _start_sleepers(sim: Simulator) -> list[Pid]:
    """A process with a child of its own in every namespace; return all their pids."""
    for role in ("enclave", "parent", "world"):
        sim.spawn("sleeper", role, ["sh", "-c", "sleep 300 & sleep 300; wait"])
    sim.popen("world", ["sleep", "300"])
    expected = 3 * 3 + 1  # each sh and its two sleeps, plus one
    wait_until(sim, lambda: len(_pids_in(sim)) >= expected, 10, "sleepers running")
    return _pids_in(sim)


def _assert_gone(name: str, state: SimState, pids: list[Pid]) -> None:
    assert not [ns for ns in list_netns() if ns.startswith(name)]
    assert not [p for p in Path("/etc/netns").glob(f"{name}-*")]
    assert not Path(state.workdir).exists()
    assert load_state(name) is None
    alive = [pid for pid, start in pids if is_alive(pid, start)]
    assert not alive, f"processes still alive: {alive}"


def test_simulator_connects_parent_to_world_and_leaves_enclave_bare(sim: Simulator) -> None:
    ping = sim.run("parent", ["ping", "-c", "1", "-W", "2", WORLD_ADDRESS])
    links = sim.run("enclave", ["ip", "-o", "link", "show"]).stdout.splitlines()
    route = sim.run("parent", ["ip", "route", "show", "default"]).stdout

    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    assert f"via {WORLD_ADDRESS}" in route
    assert f"inet {PARENT_ADDRESS}/24" in sim.run("parent", ["ip", "addr", "show", "eth0"]).stdout
    assert sim.run("parent", ["cat", "/etc/resolv.conf"]).stdout == f"nameserver {WORLD_ADDRESS}\n"
    assert sim.run("enclave", ["cat", "/etc/resolv.conf"]).stdout == ""
    assert sim.link_url == f"unix://{sim.workdir}/link.sock"


def test_simulator_cleanup_removes_namespaces_and_processes() -> None:
    with Simulator() as sim:
        pids = _start_sleepers(sim)
        state = sim.state

    _assert_gone(sim.name, state, pids)


def test_simulator_cleanup_after_exception_inside_it() -> None:
    seen: list[tuple[Simulator, list[Pid]]] = []

    def fail_inside() -> None:
        with Simulator() as sim:
            seen.append((sim, _start_sleepers(sim)))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()

    sim, pids = seen[0]
    _assert_gone(sim.name, sim.state, pids)


CHILD = """
import signal, sys, time
from nitro_netd.sim import Simulator
# As in an interactive Python: a CI job started in the background inherits SIGINT ignored,
# and Python then leaves it ignored; this child stands for a user at a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)
with Simulator() as sim:
    sim.spawn("sleeper", "world", ["sleep", "300"])
    print(sim.name, flush=True)
    if sys.argv[1] == "kill":
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    # Short sleeps: CPython does not re-check pending signals before it blocks, so a signal
    # landing just as one long sleep starts would wait for that whole sleep.
    for _ in range(3000):
        time.sleep(0.1)
"""


def _child_simulator(mode: str) -> tuple[subprocess.Popen[str], SimState]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    name = child.stdout.readline().strip()
    state = load_state(name)
    assert state is not None, f"child did not record a simulator (got {name!r})"
    return child, state


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_simulator_cleans_up_when_its_process_is_signalled(sig: signal.Signals) -> None:
    child, state = _child_simulator("wait")
    pids = [(r.pid, r.start_time) for r in state.processes]

    child.send_signal(sig)
    try:
        child.communicate(timeout=20)
    finally:
        if child.poll() is None:  # do not leak it (or its pipe) into later tests
            child.kill()
            child.communicate()

    _assert_gone(state.name, state, pids)


def test_cleanup_stale_removes_leftovers_of_a_killed_owner() -> None:
    child, state = _child_simulator("kill")
    child.communicate(timeout=20)
    pids = [(r.pid, r.start_time) for r in state.processes]
    assert child.returncode == -signal.SIGKILL
    assert any(ns.startswith(state.name) for ns in list_netns())

    removed = cleanup_stale()

    assert state.name in removed
    _assert_gone(state.name, state, pids)


def test_cleanup_stale_leaves_live_simulators_alone(sim: Simulator) -> None:
    removed = cleanup_stale()

    assert sim.name not in removed
    assert all(ns in list_netns() for ns in sim.namespaces.values())
    assert os.path.isdir(sim.workdir)

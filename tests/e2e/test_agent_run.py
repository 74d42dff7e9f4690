"""`nitro-netd-enclave run -- CMD`: bring the link up, run a command, exit with its status."""

from __future__ import annotations

import time

import pytest

from nitro_netd.sim import GATEWAY_ADDRESS, Simulator

from .helpers import assert_exit

pytestmark = [pytest.mark.netns("ping"), pytest.mark.timeout(90)]


def test_agent_run_command_exits_with_child_status(sim: Simulator) -> None:
    sim.start_parent()
    command = f"ping -c1 -W2 {GATEWAY_ADDRESS} && exit 7"

    result = sim.run(
        "enclave",
        sim.agent_argv(["run", "--link-timeout", "15", "--", "sh", "-c", command]),
        timeout=60,
    )

    assert_exit(sim, result, 7, "run -- sh -c 'ping ... && exit 7'")


def test_agent_run_without_parent_fails_after_link_timeout(sim: Simulator) -> None:
    started = time.monotonic()

    result = sim.run(
        "enclave",
        sim.agent_argv(["run", "--link-timeout", "2", "--", "true"]),
        timeout=30,
    )

    elapsed = time.monotonic() - started
    assert result.returncode != 0, f"run succeeded with no parent:\n{result.stderr}"
    assert 2.0 <= elapsed < 15.0, f"gave up after {elapsed:.1f} s, --link-timeout was 2"
    message = result.stderr.strip()
    assert message, "no message saying why it failed"
    assert "Traceback" not in message, message

"""Waiting and asserting helpers for the end-to-end tests: poll with a deadline, and put
the processes' log tails in every failure message."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Final

from nitro_netd.sim import GATEWAY_ADDRESS, ManagedProcess, SimError, Simulator

POLL_SECONDS: Final = 0.1
LINK_TIMEOUT: Final = 15.0


def wait_until(sim: Simulator, predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until it is true; fail with `what` and the log tails after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s\n{sim.logs_tail()}")
        time.sleep(POLL_SECONDS)


def wait_for_log(
    sim: Simulator, process: ManagedProcess, text: str, timeout: float, *, after: int = 0
) -> None:
    """`process.wait_for_log` as a test failure carrying every process's log tail."""
    try:
        process.wait_for_log(text, timeout, after=after)
    except SimError as exc:
        raise AssertionError(f"{exc.args[0].splitlines()[0]}\n{sim.logs_tail()}") from None


def ping_once(sim: Simulator, address: str = GATEWAY_ADDRESS) -> bool:
    """One ping from the enclave namespace; True if it was answered."""
    result = sim.run("enclave", ["ping", "-c", "1", "-W", "1", address], timeout=10)
    return result.returncode == 0


def wait_for_ping(
    sim: Simulator, address: str = GATEWAY_ADDRESS, timeout: float = LINK_TIMEOUT
) -> None:
    """Wait until the enclave's ping to `address` is answered."""
    wait_until(sim, lambda: ping_once(sim, address), timeout, f"enclave ping to {address}")


def assert_exit(
    sim: Simulator, result: subprocess.CompletedProcess[str], expected: int, what: str
) -> None:
    """Assert a command's exit status, showing its output and the log tails if not."""
    assert result.returncode == expected, (
        f"{what}: exit status {result.returncode}, expected {expected}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{sim.logs_tail()}"
    )

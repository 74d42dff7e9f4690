"""`run_foreground` (behind `nitro-netd sim exec`): SIGINT is passed on, the command gets a
grace period, then it is killed. Real processes, no root, no namespaces."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import pytest

pytestmark = pytest.mark.timeout(60)

RUNNER: Final = """
import signal, sys
# As at a terminal: a CI job started in the background inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
from nitro_netd.sim.foreground import run_foreground
print(run_foreground(sys.argv[2:], grace=float(sys.argv[1])), flush=True)
"""
"""Runs argv[2:] with `run_foreground` and a grace of argv[1] seconds; prints its status."""

COMMAND: Final = """
import pathlib, signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
pathlib.Path(sys.argv[1]).touch()
if signal.sigtimedwait({signal.SIGINT}, 30) is None:
    sys.exit(1)
if sys.argv[2] == "stubborn":
    time.sleep(30)
sys.exit(7)
"""
"""Touches argv[1], waits for SIGINT, then exits 7 (or, "stubborn", keeps running)."""


def _interrupt_runner(tmp_path: Path, behaviour: str, grace: float) -> tuple[int, float]:
    """Start the runner, SIGINT it (alone) once the command is ready; return the status it
    printed and the seconds from SIGINT to its exit."""
    ready = tmp_path / "ready"
    argv = [sys.executable, "-c", COMMAND, str(ready), behaviour]
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(grace), *argv], stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert time.monotonic() < deadline, "the command did not start"
            assert runner.poll() is None, "the runner exited early"
            time.sleep(0.02)
        runner.send_signal(signal.SIGINT)
        start = time.monotonic()
        out, _ = runner.communicate(timeout=30)
        return int(out), time.monotonic() - start
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()


def test_run_foreground_passes_sigint_on_and_returns_the_status(tmp_path: Path) -> None:
    status, _ = _interrupt_runner(tmp_path, "polite", grace=10.0)

    assert status == 7


def test_run_foreground_kills_the_command_when_the_grace_is_over(tmp_path: Path) -> None:
    status, seconds = _interrupt_runner(tmp_path, "stubborn", grace=0.5)

    assert status == -signal.SIGKILL
    assert 0.5 <= seconds < 10

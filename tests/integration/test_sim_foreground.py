"""`run_foreground` (behind `nitro-netd sim exec`): SIGINT is passed on, the command gets a
grace period, then it is killed, and what it started with it; at a terminal, the command
has the terminal. Real processes, no root, no namespaces."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest

from nitro_netd.sim.host import is_running as alive
from tests.support.stubborn import stubborn_argv

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


needs_setsid = pytest.mark.skipif(
    shutil.which("setsid") is None, reason="needs setsid (util-linux) to give a terminal"
)


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.02)


@pytest.fixture
def child_pid_file(tmp_path: Path) -> Iterator[Path]:
    """Where the command writes its child's pid; that child is killed afterwards if alive."""
    pid_file = tmp_path / "child.pid"
    yield pid_file
    if pid_file.exists() and alive(pid := int(pid_file.read_text())):
        os.kill(pid, signal.SIGKILL)


def test_run_foreground_kills_what_the_command_started_when_the_grace_is_over(
    child_pid_file: Path,
) -> None:
    argv = [sys.executable, "-c", RUNNER, "0.5", *stubborn_argv(child_pid_file)]
    runner = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        _wait_for(child_pid_file.exists, "the command started its child")
        runner.send_signal(signal.SIGINT)
        out, _ = runner.communicate(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()

    assert int(out) == -signal.SIGKILL
    child = int(child_pid_file.read_text())
    _wait_for(lambda: not alive(child), "the command's child was killed", timeout=5)


LOGIN_SHELL: Final = """trap '' INT; "$@"; read _"""
"""Runs the runner, then waits for a line: as a login shell does, it survives Ctrl-C and
keeps the session (and the terminal) alive after the runner, so the kernel does not hang
up on what the runner left."""


class _Terminal:
    """The runner under a shell that leads a session with a pseudo-terminal as its
    controlling tty, the runner in the terminal's foreground."""

    def __init__(self, grace: float, argv: list[str]) -> None:
        self.controller, tty = os.openpty()
        self.output = ""
        runner = [sys.executable, "-c", RUNNER, str(grace), *argv]
        session = ["setsid", "--ctty", "sh", "-c", LOGIN_SHELL, "sh", *runner]
        self.session = subprocess.Popen(session, stdin=tty, stdout=tty, stderr=tty)
        os.close(tty)

    def type(self, keys: bytes) -> None:
        os.write(self.controller, keys)

    def wait_for_status(self, timeout: float = 30) -> int:
        """Wait for the status the runner prints as it exits (after the terminal's echo,
        such as `^C`); return it."""
        deadline = time.monotonic() + timeout
        while (match := re.search(r"(-?\d+)\r?\n\Z", self.output)) is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the runner printed no status: {self.output!r}"
            if select.select([self.controller], [], [], remaining)[0]:
                self.output += os.read(self.controller, 4096).decode(errors="replace")
        return int(match[1])

    def close(self) -> None:
        """End the session: the shell's line, or a kill."""
        with contextlib.suppress(OSError):
            self.type(b"\n")
        try:
            self.session.wait(timeout=10)
        finally:
            if self.session.poll() is None:
                self.session.kill()
                self.session.wait()
            os.close(self.controller)


@needs_setsid
def test_run_foreground_at_a_terminal_lets_the_command_read_it() -> None:
    terminal = _Terminal(10.0, ["sh", "-c", 'read line && echo "got:$line"'])
    try:
        terminal.type(b"hello\n")
        status = terminal.wait_for_status()
    finally:
        terminal.close()

    assert "got:hello" in terminal.output
    assert status == 0, terminal.output


@needs_setsid
def test_run_foreground_at_a_terminal_kills_the_group_after_ctrl_c(
    child_pid_file: Path,
) -> None:
    terminal = _Terminal(0.5, stubborn_argv(child_pid_file))
    try:
        _wait_for(child_pid_file.exists, "the command started its child")
        terminal.type(b"\x03")
        status = terminal.wait_for_status()
        child = int(child_pid_file.read_text())
        _wait_for(lambda: not alive(child), "the command's child was killed", timeout=5)
    finally:
        terminal.close()

    assert status == -signal.SIGKILL, terminal.output

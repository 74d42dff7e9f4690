"""Run a command in the foreground and give it time to clean up after Ctrl-C.

`subprocess.run` kills its command 0.25 s after a KeyboardInterrupt; `nitro-netd sim exec`
runs servers and shells whose SIGINT handlers may need longer. Here SIGINT reaches the
command once: the terminal's Ctrl-C already went to the whole foreground process group
(the kernel is then the sender, `si_code` SI_KERNEL), and a SIGINT sent to this process
alone (`kill -INT PID`) is passed on. The command then has `grace` seconds to exit before
it is killed. Where this process ignores SIGINT (a background job of a script), so does
the command, and nothing changes.
"""

from __future__ import annotations

import contextlib
import math
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Final

INTERRUPT_GRACE: Final = 10.0
"""Seconds a command may take to exit after SIGINT before it is killed."""
SI_KERNEL: Final = 0x80
"""`si_code` of a signal the kernel sent, such as the terminal's SIGINT (Linux value)."""
SAFETY_TICK: Final = 1.0
"""Longest wait for a signal; only matters if a SIGCHLD were ever missed."""


def run_foreground(argv: Sequence[str], *, grace: float = INTERRUPT_GRACE) -> int:
    """Run `argv` with this process's stdio; return its exit status (negative: the
    signal that ended it).

    On SIGINT the command gets SIGINT (see the module docstring), then `grace` seconds to
    exit, then SIGKILL; its exit status is returned all the same. Call it from the main
    thread: it blocks SIGINT and SIGCHLD while it waits and restores the mask afterwards.
    """
    proc = subprocess.Popen(argv)
    try:
        return _wait(proc, grace)
    except KeyboardInterrupt:  # arrived before SIGINT was blocked: the sender is unknown
        _interrupt(proc)
        return _wait_until(proc, time.monotonic() + grace)


def _wait(proc: subprocess.Popen[bytes], grace: float) -> int:
    waited = {signal.SIGCHLD}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        waited.add(signal.SIGINT)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        deadline = math.inf
        while proc.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                proc.kill()
                break
            info = signal.sigtimedwait(waited, min(SAFETY_TICK, remaining))
            if info is not None and info.si_signo == signal.SIGINT and deadline == math.inf:
                if info.si_code != SI_KERNEL:
                    _interrupt(proc)
                deadline = time.monotonic() + grace
        return proc.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _wait_until(proc: subprocess.Popen[bytes], deadline: float) -> int:
    try:
        return proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)

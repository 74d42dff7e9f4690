"""Run a command in the foreground and give it time to clean up after Ctrl-C.

`subprocess.run` kills its command 0.25 s after a KeyboardInterrupt; `nitro-netd sim exec`
runs servers and shells whose SIGINT handlers may need longer. Here SIGINT reaches the
command once: the terminal's Ctrl-C already went to the whole foreground process group
(the kernel is then the sender, `si_code` SI_KERNEL), and a SIGINT sent to this process
alone (`kill -INT PID`) is passed on. The command then has `grace` seconds to exit before
it is killed. Where this process ignores SIGINT (a background job of a script), so does
the command, and nothing changes.

Nothing the command started outlives an interrupt: this process is a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so the command's children, orphaned when it exits or is
killed, become ours, and once the command has gone they are killed too (and theirs, who
become ours in turn). Without an interrupt they are left to run, as a shell leaves a
command's background jobs. The command stays in our process group and keeps the
terminal as any foreground job does: no job control is needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from nitro_netd.sim.host import stat_fields

INTERRUPT_GRACE: Final = 10.0
"""Seconds a command may take to exit after SIGINT before it is killed."""
SI_KERNEL: Final = 0x80
"""`si_code` of a signal the kernel sent, such as the terminal's SIGINT (Linux value)."""
SAFETY_TICK: Final = 1.0
"""Longest wait for a signal; only matters if a SIGCHLD were ever missed."""
COMMAND_NOT_FOUND: Final = 127
"""A shell's exit status for a command that does not exist."""
COMMAND_NOT_EXECUTABLE: Final = 126
"""A shell's exit status for a command that exists but cannot be run."""
_PR_SET_CHILD_SUBREAPER: Final = 36
_ORPHAN_ROUNDS: Final = 100
"""Rounds of killing what the command left (each round's children's children come next)."""


def command_problem(name: str) -> tuple[str, int] | None:
    """Why `name` cannot be run as a command (as `execvp` would look for it), with a
    shell's exit status for it; None if it can.

    `ip netns exec` changes the network namespace and bind-mounts files under /etc only,
    so this process sees the same programs as the command will.
    """
    path = name if "/" in name else shutil.which(name)
    if path is None:
        if shutil.which(name, mode=os.F_OK) is None:
            return f"{name}: command not found", COMMAND_NOT_FOUND
        return f"{name}: permission denied", COMMAND_NOT_EXECUTABLE
    if not os.path.exists(path):
        return f"{name}: command not found", COMMAND_NOT_FOUND
    if os.path.isdir(path):
        return f"{name}: is a directory", COMMAND_NOT_EXECUTABLE
    if not os.access(path, os.X_OK):
        return f"{name}: permission denied", COMMAND_NOT_EXECUTABLE
    return None


def run_foreground(argv: Sequence[str], *, grace: float = INTERRUPT_GRACE) -> int:
    """Run `argv` with this process's stdio; return its exit status (negative: the
    signal that ended it).

    On SIGINT the command gets SIGINT (see the module docstring), then `grace` seconds to
    exit, then SIGKILL; its exit status is returned all the same, and what it started is
    killed once it has gone. Call it from the main thread: it blocks SIGINT and SIGCHLD
    while it waits and restores the mask afterwards. It makes this process a child
    subreaper for the rest of its life.
    """
    _become_subreaper()
    proc = subprocess.Popen(argv)
    try:
        status, interrupted = _wait(proc, grace)
    except KeyboardInterrupt:  # arrived before SIGINT was blocked: the sender is unknown
        _interrupt(proc)
        status, interrupted = _wait_until(proc, time.monotonic() + grace), True
    if interrupted:
        kill_orphans()
    return status


def _wait(proc: subprocess.Popen[bytes], grace: float) -> tuple[int, bool]:
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
        return proc.wait(), deadline != math.inf
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


def _become_subreaper() -> None:
    """Adopt the command's orphans (Linux 3.4+; elsewhere they go to init, as before)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def kill_orphans() -> None:
    """Kill (and reap) this process's children, and theirs as they become ours."""
    for _ in range(_ORPHAN_ROUNDS):
        children = _children()
        if not children:
            return
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _children() -> list[int]:
    """This process's children (any thread's), from /proc."""
    me = str(os.getpid())
    children = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = stat_fields(entry.name)
        if fields is not None and len(fields) > 1 and fields[1] == me:
            children.append(int(entry.name))
    return children

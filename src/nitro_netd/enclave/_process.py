"""Forked helper processes that report one line back through a pipe.

The agent runs each pump direction, and ``run`` runs the agent, in a child made with
``os.fork``: no re-import and no pickling, and the child shares the already-open TAP and
link descriptors. A child closes every descriptor it was not given (so that a peer closing
its end of a socket is seen as EOF, not kept alive by a stray copy), dies with its parent,
writes a one-line report, and leaves with ``os._exit`` so no parent cleanup runs twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

PR_SET_PDEATHSIG: Final = 1
_REPORT_LIMIT: Final = 4096


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC: Final = _load_libc()
"""Opened once, in the parent: a forked child must not ``dlopen`` (the loader's lock may
have been held by another thread of the parent at the fork, and would never be released)."""


class Stopped(BaseException):
    """Raised in a child by SIGTERM from its parent: finish up and report."""


def raise_stopped(signum: int, frame: object) -> None:
    """Signal handler for children: turn SIGTERM into `Stopped`."""
    raise Stopped


def install_child_signals() -> None:
    """SIGTERM stops the child; terminal signals are left to the parent to act on."""
    signal.signal(signal.SIGTERM, raise_stopped)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)


@dataclass(slots=True)
class Child:
    """A forked child and the read end of its report pipe."""

    pid: int
    report_fd: int
    name: str
    exit_status: int | None = None

    def poll_exit(self) -> bool:
        """Reap the child if it has exited; True once it has."""
        if self.exit_status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_status = status
        return self.exit_status is not None


def spawn(name: str, target: Callable[[], str], keep_fds: Iterable[int]) -> Child:
    """Fork a child that runs `target` and reports the string it returns (one line)."""
    keep = {0, 1, 2, *keep_fds, *_stdio_fds()}
    parent = os.getpid()
    read_fd, write_fd = os.pipe()
    # SIGTERM stays blocked until the child has its handler, so an early stop is reported.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which leaves with os._exit
            _child_main(target, write_fd, {write_fd, *keep}, parent)
    except OSError:  # EAGAIN, ENOMEM: no child, no pipe left behind
        os.close(read_fd)
        os.close(write_fd)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.close(write_fd)
    return Child(pid, read_fd, name)


def _stdio_fds() -> list[int]:
    """Descriptors behind sys.stdout and sys.stderr (where log handlers write)."""
    fds = []
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fds.append(stream.fileno())
    return fds


def _child_main(target: Callable[[], str], write_fd: int, keep: set[int], parent: int) -> None:
    status = 1
    try:
        install_child_signals()
        close_other_fds(keep)
        die_with_parent()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        if os.getppid() != parent:  # the parent died before the request took effect
            raise Stopped
        report = target()
        status = 0
    except Stopped:
        report = "stopped"
    except BaseException as exc:  # a child must never unwind into the parent's code
        report = f"internal error: {exc!r}"
    try:
        os.write(write_fd, report.encode("utf-8", "replace")[:_REPORT_LIMIT] + b"\n")
    finally:
        os._exit(status)


def close_other_fds(keep: set[int]) -> None:
    """Close every open descriptor not in `keep`."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux)."""
    if _LIBC is not None:
        with contextlib.suppress(OSError, AttributeError):
            _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def read_report(child: Child, timeout: float) -> str | None:
    """Read the child's report until EOF; None if it did not finish within `timeout`."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([child.report_fd], [], [], remaining)[0]:
            return None
        chunk = os.read(child.report_fd, _REPORT_LIMIT)
        if not chunk:
            return b"".join(chunks).decode("utf-8", "replace").strip()
        chunks.append(chunk)


def finish(child: Child, grace: float, stop_signal: int = signal.SIGTERM) -> str:
    """Stop `child` (`stop_signal`, then SIGKILL after `grace` s), reap it, return its
    report."""
    if not child.poll_exit():
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, stop_signal)
    report = read_report(child, grace)
    if report is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        report = read_report(child, grace) or "killed"
    if child.exit_status is None:
        _, child.exit_status = os.waitpid(child.pid, 0)
    os.close(child.report_fd)
    return report or f"exited with status {os.waitstatus_to_exitcode(child.exit_status)}"

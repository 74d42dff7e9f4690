"""Turn SIGTERM and SIGHUP into an exception while simulators are open, so `with` blocks
and pytest fixtures unwind and clean up instead of the process dying on the spot.

SIGINT already raises KeyboardInterrupt; the exception used here is a subclass of it, so
callers need one `except KeyboardInterrupt`. Handlers are only installed from the main
thread and only over the default action; the previous handlers return when the last
simulator closes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Final

CAUGHT: Final = (signal.SIGTERM, signal.SIGHUP)
BLOCKED_DURING_CLEANUP: Final = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class SimulatorInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while a simulator was open."""


_lock = threading.Lock()
_users = 0
_installed: set[signal.Signals] = set()


def _raise(signum: int, frame: FrameType | None) -> None:
    raise SimulatorInterrupted(f"received {signal.Signals(signum).name}")


def acquire() -> None:
    """Install the handlers (first user only, main thread only)."""
    global _users
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        _users += 1
        if _users > 1:
            return
        for sig in CAUGHT:
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _raise)
                _installed.add(sig)


def release() -> None:
    """Restore the previous handlers when the last user is gone."""
    global _users
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        _users = max(0, _users - 1)
        if _users:
            return
        for sig in _installed:
            if signal.getsignal(sig) is _raise:
                signal.signal(sig, signal.SIG_DFL)
        _installed.clear()


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP for the duration, so cleanup is not cut short.

    Signals that arrived meanwhile are delivered (and may raise) on exit.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_DURING_CLEANUP)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

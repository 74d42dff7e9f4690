"""A long-running process a simulator started, with its log file and ways to wait on it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Final

from nitro_netd.sim.host import SimError
from nitro_netd.sim.state import Role

POLL_SECONDS: Final = 0.05


class ManagedProcess:
    """One process started inside a namespace, its stdout and stderr going to `log_path`.

    It leads its own session, so stopping it also stops whatever it started.
    """

    def __init__(
        self, name: str, role: Role, argv: list[str], popen: subprocess.Popen[bytes], log_path: Path
    ) -> None:
        self.name = name
        """Short label used in logs and messages, e.g. "parent" or "agent-2"."""
        self.role = role
        self.argv = argv
        self.popen = popen
        self.log_path = log_path

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} in {self.role} rc={self.returncode}>"

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status (negative: killed by that signal), or None while it runs."""
        return self.popen.poll()

    def is_alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def log_text(self, *, after: int = 0) -> str:
        """The log from byte offset `after` on (see `log_mark`)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(after)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """The log's current size: pass it as `after` to look only at what comes next."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, lines: int = 25) -> str:
        """The last `lines` lines of the log, headed with the process name and status."""
        status = "running" if self.is_alive() else f"exited {self.returncode}"
        tail = self.log_text().splitlines()[-lines:]
        body = "\n".join(f"  | {line}" for line in tail) or "  | (empty log)"
        return f"--- {self.name} (pid {self.pid}, {status}) {self.log_path}\n{body}"

    def wait_for_log(self, text: str, timeout: float, *, after: int = 0) -> None:
        """Wait until `text` appears in the log past offset `after`.

        Raises:
            SimError: the process exited first, or `timeout` seconds passed (with the log tail).
        """
        deadline = time.monotonic() + timeout
        while text not in self.log_text(after=after):
            if not self.is_alive():
                # One last look: it may have logged the line just before exiting.
                if text in self.log_text(after=after):
                    return
                raise SimError(
                    f"{self.name} exited ({self.returncode}) before logging {text!r}\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                raise SimError(
                    f"{self.name} did not log {text!r} within {timeout:g} s\n" + self.log_tail()
                )
            time.sleep(POLL_SECONDS)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 5.0) -> int:
        """Send `sig` to the process group, SIGKILL it after `timeout`; return the exit status."""
        if self.is_alive():
            self._signal_group(sig)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
        else:
            # The leader is gone; its group may still hold children it started.
            self._signal_group(signal.SIGKILL)
        return self.popen.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

"""`Simulator`: three network namespaces standing in for an enclave, its parent and the world.

```python
with Simulator() as sim:
    sim.start_parent()
    agent = sim.start_agent()
    agent.wait_for_log("link up", timeout=15)
    print(sim.run("enclave", ["ping", "-c", "3", "192.168.127.1"]).stdout)
```

The link is a unix socket in the work dir (`sim.link_url`) in place of vsock. Leaving the
`with` block, by return, exception, Ctrl-C or SIGTERM, stops every process the simulator
started and removes its namespaces, /etc/netns dirs, work dir and state file.
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from nitro_netd.sim import signals, topology
from nitro_netd.sim.host import SimError, process_start_time, require_host
from nitro_netd.sim.process import ManagedProcess
from nitro_netd.sim.state import ETC_NETNS, NAME_PREFIX, ProcessRecord, Role, SimState

READY_TIMEOUT: Final = 15.0
PARENT_READY_LOG: Final = "listening on unix://"
PASST_READY_LOG: Final = "UNIX domain socket bound at"
PASST_USER: Final = "nobody"


class Simulator:
    """A disposable enclave/parent/world network; see the module docstring.

    Args:
        python: interpreter that runs the daemon and the agent (default: this one).
        handle_signals: turn SIGTERM/SIGHUP into `SimulatorInterrupted` while open.
    """

    def __init__(self, *, python: str = sys.executable, handle_signals: bool = True) -> None:
        self.name = f"{NAME_PREFIX}-{secrets.token_hex(3)}"
        self.python = python
        self._handle_signals = handle_signals
        self._state: SimState | None = None
        self._owner_pid = os.getpid()
        self._processes: list[ManagedProcess] = []
        self._popens: list[subprocess.Popen[Any]] = []
        self._counter = itertools.count(1)
        self._open = False

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Build the namespaces.

        Raises:
            HostUnfit: not root or a tool is missing (message says what to install).
            SimError: building failed; whatever was built is removed again.
        """
        require_host()
        if self._handle_signals:
            signals.acquire()
        self._open = True
        try:
            workdir = tempfile.mkdtemp(prefix=f"{self.name}-")
            os.chmod(workdir, 0o755)  # passt runs as nobody and must reach its socket dir
            self._state = SimState(
                name=self.name,
                workdir=workdir,
                owner_pid=self._owner_pid,
                owner_start_time=process_start_time(self._owner_pid),
            )
            self._state.save()
            (self.workdir / "logs").mkdir()
            topology.build(self._state)
        except BaseException:
            self.close()
            raise

    def close(self) -> list[str]:
        """Stop every process started here and remove every trace of the simulator.

        Safe to call twice; a no-op in a forked child. Ctrl-C and SIGTERM are held until
        it is done.

        Returns:
            Lines describing anything that could not be removed (also kept in the state
            file so `cleanup_stale()` retries).
        """
        if not self._open or os.getpid() != self._owner_pid:
            return []
        problems: list[str] = []
        with signals.deferred():
            for process in self._processes:
                process.stop(timeout=3.0)
            for popen in self._popens:
                _stop_popen(popen)
            if self._state is not None:
                problems = topology.teardown(self._state)
            self._open = False
            if self._handle_signals:
                signals.release()
        return problems

    def detach(self) -> SimState:
        """Leave the simulator running after this process exits (`nitro-netd sim up`).

        Its processes keep running; `nitro-netd sim down NAME` removes it.
        """
        state = self.state
        state.owner_pid = None
        state.owner_start_time = None
        state.save()
        self._open = False
        if self._handle_signals:
            signals.release()
        return state

    # -- names and paths ---------------------------------------------------------------

    @property
    def state(self) -> SimState:
        """The recorded state (raises SimError before `start()`)."""
        if self._state is None:
            raise SimError("simulator not started")
        return self._state

    @property
    def workdir(self) -> Path:
        """Temporary dir holding the link socket and the logs."""
        return Path(self.state.workdir)

    @property
    def namespaces(self) -> dict[Role, str]:
        """Network namespace name for each role."""
        return self.state.namespaces

    @property
    def link_path(self) -> Path:
        """The unix socket standing in for vsock."""
        return self.workdir / "link.sock"

    @property
    def daemon_state_dir(self) -> Path:
        """A `--state-dir` for a daemon `nitro-netd status` should find (removed on close)."""
        return self.state.daemon_state_dir

    @property
    def link_url(self) -> str:
        """`unix://<workdir>/link.sock`: the daemon's --listen and the agent's --parent."""
        return self.state.link_url

    def netns(self, role: Role | str) -> str:
        """The network namespace name of a role ("enclave", "parent" or "world")."""
        return self.namespaces[Role(role)]

    def etc_path(self, role: Role | str, filename: str) -> Path:
        """The file that `ip netns exec` shows as /etc/FILENAME in that namespace."""
        return ETC_NETNS / self.netns(role) / filename

    @property
    def processes(self) -> list[ManagedProcess]:
        """Every process started with `spawn` and its helpers, in order."""
        return list(self._processes)

    # -- running things ----------------------------------------------------------------

    def ns_argv(self, role: Role | str, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside a namespace (`ip netns exec NS ...`)."""
        return ["ip", "netns", "exec", self.netns(role), *argv]

    def popen(self, role: Role | str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside a namespace; it is stopped on close.

        Keyword arguments go to `subprocess.Popen`; by default the process leads a new
        session so that stopping it stops its children too.
        """
        kwargs.setdefault("start_new_session", True)
        popen: subprocess.Popen[Any] = subprocess.Popen(self.ns_argv(role, argv), **kwargs)
        self._popens.append(popen)
        self._record(popen.pid, f"{Role(role)}:{argv[0] if argv else ''}")
        return popen

    def run(
        self, role: Role | str, argv: Sequence[str], *, timeout: float = 30.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside a namespace to completion and capture its output as text.

        Raises:
            subprocess.TimeoutExpired: it ran longer than `timeout` (it is killed).
        """
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("check", False)
        return subprocess.run(self.ns_argv(role, argv), timeout=timeout, **kwargs)

    def spawn(
        self,
        name: str,
        role: Role | str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        """Start a long-running process inside a namespace, output to `logs/NAME-N.log`."""
        label = f"{name}-{next(self._counter)}"
        log_path = self.workdir / "logs" / f"{label}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        argv = list(argv)
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                self.ns_argv(role, argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        process = ManagedProcess(label, Role(role), argv, popen, log_path)
        self._processes.append(process)
        self._record(popen.pid, label)
        return process

    def _record(self, pid: int, name: str) -> None:
        self.state.processes.append(ProcessRecord(pid, process_start_time(pid), name))
        self.state.save()

    # -- the daemon, the agent and peers -----------------------------------------------

    def parent_argv(
        self, extra_args: Sequence[str] = (), *, listen: str | None = None
    ) -> list[str]:
        """The daemon's command line, listening on the link socket."""
        return [
            self.python, "-m", "nitro_netd.cli.parent",
            "--listen", listen or self.link_url, *extra_args,
        ]  # fmt: skip

    def agent_argv(self, extra_args: Sequence[str] = (), *, parent: str | None = None) -> list[str]:
        """The agent's command line, connecting to the link socket; `extra_args` go last
        (e.g. `["--protocol", "qemu"]` or `["run", "--link-timeout", "2", "--", "sh"]`)."""
        return [
            self.python, "-m", "nitro_netd.cli.enclave",
            "--parent", parent or self.link_url, *extra_args,
        ]  # fmt: skip

    def start_parent(
        self, extra_args: Sequence[str] = (), *, wait_ready: bool = True
    ) -> ManagedProcess:
        """Start `nitro-netd-parent` in the parent namespace.

        Args:
            extra_args: more daemon arguments, e.g. `["--mtu", "1500", "--log-level", "debug"]`.
            wait_ready: return only once it logged that it is listening.

        Raises:
            SimError: it exited or was not ready within 15 s (with its log tail).
        """
        process = self.spawn("parent", Role.PARENT, self.parent_argv(extra_args))
        if wait_ready:
            process.wait_for_log(PARENT_READY_LOG, READY_TIMEOUT)
        return process

    def start_agent(
        self, extra_args: Sequence[str] = (), *, parent: str | None = None
    ) -> ManagedProcess:
        """Start `nitro-netd-enclave` in the enclave namespace (it waits for the parent
        itself; use `wait_for_log("link up", ...)` to know when the link is up)."""
        return self.spawn("agent", Role.ENCLAVE, self.agent_argv(extra_args, parent=parent))

    def start_passt(
        self, extra_args: Sequence[str] = (), *, wait_ready: bool = True
    ) -> tuple[ManagedProcess, str]:
        """Start Debian's passt in the parent namespace as the parent engine (QEMU framing).

        It hands the enclave 192.168.127.2/24 with gateway .1, like our daemon. Started as
        root it drops to `nobody`, so its socket lives in a dir `nobody` owns. passt does not
        answer pings to its gateway, so readiness is the log line saying its socket is bound
        (waited for unless `wait_ready` is false).

        Returns:
            The process and the `unix://` URL to give the agent (with `--protocol qemu`).
        """
        sock_dir = self.workdir / "passt"
        sock_dir.mkdir(exist_ok=True)
        _chown_to(sock_dir, PASST_USER)
        sock = sock_dir / "passt.sock"
        argv = [
            "passt", "--foreground", "--stderr", "--socket", str(sock),
            "--address", topology.ENCLAVE_ADDRESS, "--netmask", "24",
            "--gateway", topology.GATEWAY_ADDRESS, "--ipv4-only",
            "--pid", str(sock_dir / "passt.pid"), *extra_args,
        ]  # fmt: skip
        process = self.spawn("passt", Role.PARENT, argv)
        if wait_ready:
            process.wait_for_log(PASST_READY_LOG, READY_TIMEOUT)
        return process, f"unix://{sock}"

    def logs_tail(self, lines: int = 25) -> str:
        """The log tails of every process started here: put them in assertion messages."""
        if not self._processes:
            return "(no processes started)"
        return "\n".join(process.log_tail(lines) for process in self._processes)

    def __repr__(self) -> str:
        return f"<Simulator {self.name} open={self._open}>"


def _stop_popen(popen: subprocess.Popen[Any]) -> None:
    if popen.poll() is None:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(popen.pid, signum)
            except (ProcessLookupError, PermissionError):
                popen.send_signal(signum)
            try:
                popen.wait(3.0)
                break
            except subprocess.TimeoutExpired:
                continue
    popen.wait()
    for stream in (popen.stdin, popen.stdout, popen.stderr):
        if stream is not None:
            stream.close()


def _chown_to(path: Path, user: str) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise SimError(f"user {user!r} not found (passt drops privileges to it)") from exc
    os.chown(path, entry.pw_uid, entry.pw_gid)

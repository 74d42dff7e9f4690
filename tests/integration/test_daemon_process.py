"""`nitro-netd-parent` as a process on unix sockets: --daemonize readiness, single instance,
SIGTERM cleanup, systemd notify, --exit-with-enclave. No namespaces, no root needed."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nitro_netd.parent.lifecycle import read_pid
from nitro_netd.sim.host import is_running as alive
from tests.support.ports import free_port

TIMEOUT = 15.0
NAME = "app"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)


def stop_cleanly(daemon: subprocess.Popen[Any]) -> None:
    """The daemon still runs, and SIGTERM stops it with status 0."""
    assert daemon.poll() is None, f"the daemon died: {daemon.returncode}"
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(TIMEOUT) == 0


class Workdir:
    """Paths of one test's daemon, and the daemons it started (stopped at the end)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.link = root / "link.sock"
        self.pids: list[int] = []

    @property
    def pidfile(self) -> Path:
        return self.state / NAME / "parent.pid"

    @property
    def control(self) -> Path:
        return self.state / NAME / "control.sock"

    def argv(self, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "nitro_netd.cli.parent", "--listen", f"unix://{self.link}",
            "--enclave-name", NAME, "--state-dir", str(self.state), *extra,
        ]  # fmt: skip

    def daemonize(self, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv("--daemonize", *extra), capture_output=True, text=True, timeout=60, cwd=cwd
        )
        pid = read_pid(self.pidfile)
        if result.returncode == 0 and pid is not None:
            self.pids.append(pid)
        return result

    def stop_all(self) -> None:
        for pid in self.pids:
            if alive(pid) and str(self.state).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Workdir]:
    work = Workdir(tmp_path)
    try:
        yield work
    finally:
        work.stop_all()


def test_daemonize_returns_when_link_and_exposed_port_are_ready(work: Workdir) -> None:
    port = free_port()
    result = work.daemonize("--expose", f"{port}:80")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""

    # No waiting: everything is bound once it returned.
    pid = read_pid(work.pidfile)
    assert pid is not None
    assert alive(pid)
    with socket.socket(socket.AF_UNIX) as link:
        link.connect(str(work.link))
    # With no enclave link the daemon resets clients: a reset, not a refusal, proves it.
    with contextlib.suppress(ConnectionResetError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert work.control.exists()
    assert (work.state / NAME / "parent.log").exists()


def test_sigterm_stops_with_status_0_and_removes_state_files(work: Workdir) -> None:
    assert work.daemonize().returncode == 0
    pid = read_pid(work.pidfile)
    assert pid is not None

    os.kill(pid, signal.SIGTERM)

    wait_until(lambda: not alive(pid), "daemon exits on SIGTERM")
    assert not work.pidfile.exists()
    assert not work.control.exists()
    assert not work.link.exists()
    log = (work.state / NAME / "parent.log").read_text()
    assert "stopping" in log
    assert "Traceback" not in log


def test_second_daemon_for_a_name_is_refused_naming_the_first_pid(work: Workdir) -> None:
    assert work.daemonize().returncode == 0
    pid = read_pid(work.pidfile)

    second = subprocess.run(
        work.argv("--listen", f"unix://{work.root}/other.sock"),
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert second.returncode == 1
    assert f"already running (pid {pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert read_pid(work.pidfile) == pid, "the first daemon's pidfile must be untouched"
    assert work.control.exists()


def test_daemonize_refuses_a_log_file_in_a_missing_directory_as_the_foreground_does(
    work: Workdir,
) -> None:
    missing = work.root / "missing" / "parent.log"
    result = work.daemonize("--log-file", str(missing))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"nitro-netd-parent: error: cannot open --log-file {missing}: No such file or directory"
    ]
    assert not missing.parent.exists()
    assert not work.pidfile.exists()


def status(work: Workdir) -> subprocess.CompletedProcess[str]:
    """`nitro-netd status --state-dir STATE` (no name)."""
    argv = [sys.executable, "-m", "nitro_netd.cli.status", "--state-dir", str(work.state)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def daemonize_named(work: Workdir, name: str) -> int:
    """Start a daemon for `name` on its own link socket; return its pid."""
    link = f"unix://{work.root}/{name}.sock"
    result = work.daemonize("--enclave-name", name, "--listen", link)
    assert result.returncode == 0, result.stderr
    pid = read_pid(work.state / name / "parent.pid")
    assert pid is not None
    work.pids.append(pid)
    return pid


def test_status_without_a_name_shows_the_one_live_daemon_not_a_killed_one(
    work: Workdir,
) -> None:
    killed, live = daemonize_named(work, "a"), daemonize_named(work, "b")
    os.kill(killed, signal.SIGKILL)  # leaves a/parent.pid and a/control.sock behind
    wait_until(lambda: not alive(killed), "daemon a dies")

    shown = status(work)
    assert (shown.returncode, shown.stderr) == (0, "")
    assert shown.stdout.splitlines()[0] == "nitro-netd-parent b"

    os.kill(live, signal.SIGTERM)
    wait_until(lambda: not alive(live), "daemon b stops")
    none = status(work)
    assert none.returncode == 1
    assert none.stderr.strip() == (
        f"nitro-netd status: error: no nitro-netd-parent is running under {work.state}"
        " (a: left by a daemon that died)"
    )


def test_daemonize_failure_prints_the_error_and_leaves_nothing(work: Workdir) -> None:
    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = work.daemonize("--expose", str(port))

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"nitro-netd-parent: error: cannot expose tcp port {port}: Address already in use"
        f" (something else listens there: see ss -lnp 'sport = :{port}'; stop it or expose"
        " another parent port)"
    )
    assert not (work.state / NAME).exists()
    assert not work.link.exists()


def test_foreground_speaks_systemd_notify_ready_and_stopping(work: Workdir) -> None:
    notify_path = work.root / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(TIMEOUT)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        daemon = subprocess.Popen(work.argv(), env=env, stderr=subprocess.PIPE, text=True)
        try:
            ready = notify.recv(4096).decode().splitlines()
            assert "READY=1" in ready
            assert f"MAINPID={daemon.pid}" in ready
            assert work.control.exists()
            assert work.link.exists()
            daemon.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
            assert daemon.wait(TIMEOUT) == 0
        finally:
            daemon.kill()
            daemon.wait()
            assert daemon.stderr is not None
            daemon.stderr.close()
    assert not work.pidfile.exists()
    assert not work.control.exists()
    assert not work.link.exists()


def test_exit_with_enclave_exits_0_once_the_enclave_is_gone(work: Workdir) -> None:
    enclaves = work.root / "enclaves.json"
    enclaves.write_text(json.dumps([{"EnclaveName": NAME, "EnclaveCID": 16, "State": "RUNNING"}]))
    fake = work.root / "nitro-cli"
    fake.write_text(f"#!/bin/sh\nexec cat {enclaves}\n")
    fake.chmod(0o755)
    daemon = subprocess.Popen(
        work.argv("--nitro-cli", str(fake), "--enclave-poll", "0.1", "--exit-with-enclave"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(work.control.exists, "daemon ready")
        enclaves.write_text("[]")
        assert daemon.wait(TIMEOUT) == 0
    finally:
        daemon.kill()
        daemon.wait()
    assert daemon.stderr is not None
    log = daemon.stderr.read()
    daemon.stderr.close()
    assert "enclave app is gone" in log
    assert not work.pidfile.exists()
    assert not work.control.exists()
    assert not work.link.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--exit-with-enclave", "--nitro-cli", "/nonexistent/nitro-cli"), "--exit-with-enclave needs nitro-cli"),
        (("--nitro-cli", "/nonexistent/nitro-cli"), "not an executable"),
        (("--enclave-name", "../etc"), "--enclave-name '../etc'"),
        (("--metrics-listen", "localhost"), "expected HOST:PORT"),
    ],
)  # fmt: skip
def test_bad_lifecycle_flags_exit_2_with_one_line(
    work: Workdir, args: tuple[str, ...], message: str
) -> None:
    result = subprocess.run(work.argv(*args), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not work.state.exists()


def test_sigusr1_while_starting_does_not_kill_the_daemon(work: Workdir) -> None:
    """SIGUSR1 logs the flows once serving; while start-up waits on a slow nitro-cli its
    default action (terminate, no clean-up) must not apply."""
    signal_while_starting(work, signal.SIGUSR1)


def test_sighup_while_starting_does_not_kill_the_daemon(work: Workdir) -> None:
    """SIGHUP reopens the log once serving; before, its default action must not apply."""
    signal_while_starting(work, signal.SIGHUP)


def signal_while_starting(work: Workdir, signum: signal.Signals) -> None:
    asked, go = work.root / "asked", work.root / "go"
    fake = work.root / "nitro-cli"
    fake.write_text(
        f"#!/bin/sh\ntouch {asked}\nwhile [ ! -e {go} ]; do sleep 0.01; done\necho '[]'\n"
    )
    fake.chmod(0o755)
    daemon = subprocess.Popen(work.argv("--nitro-cli", str(fake)), stderr=subprocess.DEVNULL)
    try:
        wait_until(asked.exists, "the daemon asking nitro-cli during start-up")
        daemon.send_signal(signum)
        go.touch()
        wait_until(work.control.exists, "daemon ready")
        stop_cleanly(daemon)
    finally:
        daemon.kill()
        daemon.wait()
    assert not work.pidfile.exists()


def test_an_unopenable_log_file_is_one_line_and_exit_2(work: Workdir) -> None:
    result = subprocess.run(
        work.argv("--log-file", str(work.root / "missing" / "parent.log")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"nitro-netd-parent: error: cannot open --log-file {work.root}/missing/parent.log:"
        " No such file or directory"
    ]


# --- SIGHUP: reopen the log file (logrotate) ------------------------------------------


def wait_for_text(path: Path, text: str) -> str:
    """The file's content once it contains `text` (polled, with a deadline)."""
    wait_until(lambda: path.exists() and text in path.read_text(), f"{text!r} in {path}")
    return path.read_text()


def rotate_and_hup(log: Path, pid: int) -> Path:
    """What logrotate does: rename the log, then SIGHUP the daemon; return the old file."""
    rotated = log.with_name(log.name + ".1")
    log.rename(rotated)
    os.kill(pid, signal.SIGHUP)
    wait_for_text(log, f"SIGHUP: reopened the log file {log}")
    assert alive(pid)
    return rotated


def test_sighup_reopens_a_daemonized_relative_log_file_after_logrotate(work: Workdir) -> None:
    """`--log-file` relative to where it was started, though the daemon runs in /."""
    log = work.root / "parent.log"
    assert work.daemonize("--log-file", "parent.log", cwd=work.root).returncode == 0
    pid = read_pid(work.pidfile)
    assert pid is not None
    wait_for_text(log, "ready")

    rotated = rotate_and_hup(log, pid)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), "daemon exits on SIGTERM")

    assert "stopping" in log.read_text()
    assert "stopping" not in rotated.read_text()
    assert "Traceback" not in log.read_text() + rotated.read_text()
    assert not work.pidfile.exists()


def test_sighup_reopens_a_foreground_log_file_after_logrotate(work: Workdir) -> None:
    log = work.root / "parent.log"
    daemon = subprocess.Popen(work.argv("--log-file", str(log)), stderr=subprocess.DEVNULL)
    try:
        wait_for_text(log, "ready")
        rotated = rotate_and_hup(log, daemon.pid)
        stop_cleanly(daemon)
    finally:
        daemon.kill()
        daemon.wait()
    assert "stopping" in log.read_text()
    assert "stopping" not in rotated.read_text()
    assert not work.pidfile.exists()


def test_sighup_when_logging_to_stderr_says_there_is_nothing_to_reopen(work: Workdir) -> None:
    stderr = work.root / "stderr"
    with stderr.open("w") as out:
        daemon = subprocess.Popen(work.argv(), stderr=out)
    try:
        wait_for_text(stderr, "ready")
        daemon.send_signal(signal.SIGHUP)
        wait_for_text(stderr, "SIGHUP: logging to stderr, nothing to reopen")
        stop_cleanly(daemon)
    finally:
        daemon.kill()
        daemon.wait()
    assert not work.pidfile.exists()


def test_a_terminal_that_hangs_up_stops_the_daemon_cleanly(work: Workdir) -> None:
    """A foreground daemon logging to its controlling terminal gets SIGHUP when the
    terminal hangs up (an SSH session dropped): it stops as for SIGTERM (exit 0, state
    removed) instead of running on with nowhere to log. The hang-up is real: the
    terminal's other end closes, and the kernel has already cut the daemon's stderr off
    when the signal arrives."""
    controller, terminal = os.openpty()

    def take_the_terminal() -> None:  # in the child, after setsid: its controlling tty
        fcntl.ioctl(2, termios.TIOCSCTTY, 0)

    try:
        daemon = subprocess.Popen(
            work.argv(), stderr=terminal, start_new_session=True, preexec_fn=take_the_terminal
        )
    finally:
        os.close(terminal)
    output = bytearray()
    try:
        deadline = time.monotonic() + TIMEOUT
        while b"ready" not in output:  # (read, or the daemon blocks on a full terminal)
            assert time.monotonic() < deadline, f"not ready: {bytes(output)!r}"
            if select.select([controller], [], [], 0.1)[0]:
                output.extend(os.read(controller, 65536))
        os.close(controller)  # hang up
        controller = -1
        assert daemon.wait(TIMEOUT) == 0
    finally:
        if controller >= 0:
            os.close(controller)
        daemon.kill()
        daemon.wait()
    assert not work.pidfile.exists()

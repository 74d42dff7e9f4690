"""``nitro-netd-enclave`` end to end without root: the TAP setup is replaced by a
SOCK_SEQPACKET socketpair and the parent by a fake one on a unix socket."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nitro_netd.cli import enclave as cli
from nitro_netd.enclave.netconfig import InterfacePlan
from nitro_netd.link import HttpHeadReader, build_connect_reply
from nitro_netd.transport import Endpoint, Scheme, open_listener

TIMEOUT = 20.0


class ReplyingParent:
    """Accepts links in a thread, answers each handshake and holds the link open."""

    def __init__(self, path: Path) -> None:
        self.listener = open_listener(Endpoint(Scheme.UNIX, path=str(path)))
        self.links: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            reader = HttpHeadReader()
            while reader.receive_data(conn.recv(4096)) is None:
                pass
            conn.sendall(build_connect_reply())
            self.links.append(conn)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(TIMEOUT)
        for conn in self.links:
            conn.close()


@pytest.fixture
def fake_tap(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """Replace TAP creation and configuration; yield the test's end of the fake TAP."""
    agent_end, test_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def bring_up(plan: InterfacePlan, resolv_conf: str | None, **kwargs: object) -> int:
        return os.dup(agent_end.fileno())

    monkeypatch.setattr(cli, "bring_up_network", bring_up)
    monkeypatch.setattr(cli, "_default_routes_to_keep", lambda plan: [])  # no netlink here
    yield test_end
    agent_end.close()
    test_end.close()


@pytest.fixture
def parent_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "parent.sock"
    parent = ReplyingParent(path)
    yield path
    parent.close()


def test_cli_run_exits_with_the_command_status(
    fake_tap: socket.socket, parent_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--parent", f"unix://{parent_path}", "--", "sh", "-c", "exit 7"]
    assert cli.main(argv) == 7
    assert "link up: nitro-netd (protocol version 1)" in capfd.readouterr().err


def test_cli_run_command_not_found_is_127(
    fake_tap: socket.socket, parent_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--parent", f"unix://{parent_path}", "--", "/nonexistent/cmd"]
    assert cli.main(argv) == 127
    assert "command not found" in capfd.readouterr().err


def test_cli_run_without_parent_fails_after_link_timeout(
    fake_tap: socket.socket, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "run",
        "--parent",
        f"unix://{tmp_path}/none.sock",
        "--link-timeout",
        "0.5",
        "--",
        "true",
    ]
    started = time.monotonic()
    assert cli.main(argv) == 1
    assert 0.5 <= time.monotonic() - started < 10
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert "did not come up within 0.5 s" in err


def test_cli_run_forwards_sigterm_to_the_command(
    fake_tap: socket.socket, parent_path: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    script = f"touch {marker}; exec sleep 30"

    def terminate_when_started() -> None:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_when_started, daemon=True)
    killer.start()
    started = time.monotonic()
    status = cli.main(["run", "--parent", f"unix://{parent_path}", "--", "sh", "-c", script])
    killer.join(TIMEOUT)
    assert status == 128 + signal.SIGTERM
    assert time.monotonic() - started < 15


AGENT_SCRIPT = textwrap.dedent(
    """
    import os, socket, sys
    from nitro_netd.cli import enclave as cli
    agent_end, test_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cli.bring_up_network = lambda plan, resolv_conf, **kw: os.dup(agent_end.fileno())
    cli._default_routes_to_keep = lambda plan: []
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def test_cli_plain_agent_exits_0_on_sigterm(parent_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, "--parent", f"unix://{parent_path}"],
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        lines: list[str] = []
        while not any("link up:" in line for line in lines):
            line = proc.stderr.readline()
            assert line, f"agent exited early: {''.join(lines)}"
            lines.append(line)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(TIMEOUT) == 0
    assert "Traceback" not in rest
    assert "stopped" in rest


def test_cli_run_a_file_the_kernel_cannot_execute_is_126(
    fake_tap: socket.socket, parent_path: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "not-a-program"
    garbage.write_bytes(b"\x00\x01\x02 garbage")
    garbage.chmod(0o755)
    argv = ["run", "--parent", f"unix://{parent_path}", "--", str(garbage)]
    assert cli.main(argv) == 126
    err = capfd.readouterr().err
    assert "Exec format error" in err
    assert "Traceback" not in err


def test_cli_run_writes_the_users_link_up_fd_too(
    fake_tap: socket.socket, parent_path: Path
) -> None:
    read_fd, write_fd = os.pipe()
    try:
        argv = ["run", "--parent", f"unix://{parent_path}", "--link-up-fd", str(write_fd)]
        assert cli.main([*argv, "--", "true"]) == 0
        os.set_blocking(read_fd, False)
        assert os.read(read_fd, 16) == b"U"
    finally:
        os.close(read_fd)
        os.close(write_fd)


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_cli_run_a_signal_while_waiting_for_the_link_ends_it_cleanly(
    fake_tap: socket.socket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    signum: int,
    status: int,
) -> None:
    """Ctrl-C, a stop (systemd, docker) or a hang-up before the command runs: no traceback,
    the shell's status, and the clean-up (resolv.conf) done."""
    waiting = threading.Event()
    real_wait = cli._wait_link_up

    def wait_link_up(*args: object) -> str | None:
        waiting.set()
        return real_wait(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "_wait_link_up", wait_link_up)

    main_thread, done = threading.get_ident(), threading.Event()

    def interrupt() -> None:  # again until it is seen: one may land just before a select
        if waiting.wait(TIMEOUT):
            while signal.getsignal(signum) is cli._interrupt and not done.is_set():
                signal.pthread_kill(main_thread, signum)
                done.wait(0.05)

    threading.Thread(target=interrupt, daemon=True).start()
    argv = ["run", "--parent", f"unix://{tmp_path}/none.sock", "--link-timeout", "30"]
    try:
        assert cli.main([*argv, "--", "true"]) == status
    finally:
        done.set()
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert f"interrupted by {signal.Signals(signum).name}" in err


def test_cli_run_a_signal_to_the_whole_group_leaves_the_link_up_while_the_command_ends(
    tmp_path: Path,
) -> None:
    """Ctrl-C or ``kill -- -PGID`` reaches every process of the group: the command must
    keep its network while it shuts down (drains, flushes), and only then lose it."""
    path = tmp_path / "parent.sock"
    parent = ReplyingParent(path)
    started, got_term, release = tmp_path / "started", tmp_path / "got-term", tmp_path / "go"
    script = (  # bounded loops: nothing outlives the test even if it fails
        f"trap 'touch {got_term}; for i in $(seq 2000); do [ -e {release} ] && exit 0;"
        f" sleep 0.01; done; exit 3' TERM; touch {started};"
        " for i in $(seq 2000); do sleep 0.01; done; exit 4"
    )
    argv = [sys.executable, "-c", AGENT_SCRIPT, "run", "--parent", f"unix://{path}"]
    process = subprocess.Popen([*argv, "--", "sh", "-c", script], start_new_session=True)
    try:
        wait_for_file(started)
        assert len(parent.links) == 1
        os.killpg(process.pid, signal.SIGTERM)
        wait_for_file(got_term)
        link = parent.links[0]
        with pytest.raises(BlockingIOError):  # open and quiet: no EOF from the agent
            link.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        assert len(parent.links) == 1, "the agent reconnected: its pump was stopped"
        release.touch()
        assert process.wait(TIMEOUT) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # run and its command (its group)
        process.wait()
        parent.close()


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)

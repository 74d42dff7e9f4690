"""The `nitro-netd` command: the demo and the `sim` subcommands."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nitro_netd.cli.umbrella import main
from nitro_netd.sim import GATEWAY_ADDRESS, Simulator, destroy, load_state
from nitro_netd.sim.foreground import INTERRUPT_GRACE, SI_KERNEL
from nitro_netd.sim.host import is_running as alive
from nitro_netd.sim.host import list_netns
from nitro_netd.sim.state import STATE_DIR
from tests.support.stubborn import stubborn_argv

from .helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

pytestmark = [pytest.mark.netns("ping"), pytest.mark.timeout(90)]


def test_demo_pings_gateway_and_cleans_up() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nitro_netd.cli.umbrella", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Result: OK" in result.stdout
    match = re.search(r"Built simulator (nnd-[0-9a-f]{6})", result.stdout)
    assert match, result.stdout
    assert not [ns for ns in list_netns() if ns.startswith(match[1])]
    assert load_state(match[1]) is None


def test_sim_up_exec_list_down(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "up"]) == 0
    out, err = capsys.readouterr()
    name = out.strip()
    try:
        assert re.fullmatch(r"nnd-[0-9a-f]{6}", name), out
        assert f"simulator {name} is up" in err
        assert main(["sim", "exec", name, "world", "--", "sh", "-c", "exit 3"]) == 3
        assert main(["sim", "list"]) == 0
        assert re.search(rf"{name}\s+detached", capsys.readouterr().out)

        assert main(["sim", "down", name]) == 0
    finally:
        _remove_named_in(out + err)

    assert not [ns for ns in list_netns() if ns.startswith(name)]
    assert main(["sim", "down", name]) == 1
    assert "no simulator named" in capsys.readouterr().err


def _umbrella(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nitro_netd.cli.umbrella", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _remove_named_in(output: str) -> None:
    """Remove every simulator `output` names (whatever went wrong while it ran)."""
    for name in set(re.findall(r"nnd-[0-9a-f]{6}", output)):
        if load_state(name) is not None:
            destroy(name, force=True)


def _assert_removed(name: str) -> None:
    assert not [ns for ns in list_netns() if ns.startswith(name)]
    assert load_state(name) is None
    assert not (STATE_DIR / name).exists()


def test_sim_up_bridge_prints_a_status_command_that_works() -> None:
    up = _umbrella("sim", "up", "--bridge")
    name = up.stdout.strip()
    try:
        assert re.fullmatch(r"nnd-[0-9a-f]{6}", name), up.stdout + up.stderr
        assert up.returncode == 0, up.stdout + up.stderr
        command = re.search(r"^status:\s+(.+)$", up.stderr, re.MULTILINE)
        assert command, up.stderr
        status = subprocess.run(
            shlex.split(command[1]), capture_output=True, text=True, timeout=30, check=False
        )
        ping = _umbrella(
            "sim", "exec", name, "enclave", "--", "ping", "-c1", "-W2", GATEWAY_ADDRESS
        )
    finally:
        _remove_named_in(up.stdout + up.stderr)

    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"^\s+link\s+up for", status.stdout, re.MULTILINE), status.stdout
    assert ping.returncode == 0, ping.stdout + ping.stderr
    _assert_removed(name)


def _readme_simulator_example() -> str:
    section = README.read_text(encoding="utf-8").split("\n## The simulator\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section.split("\n## ", 1)[0], re.DOTALL)
    assert block, "no sh block in the README's simulator section"
    return block[1]


def _venv_root(tmp_path: Path) -> Path:
    """A dir whose `.venv/bin/activate` puts this interpreter's nitro-netd on PATH: the
    clone's own after scripts/setup, or else a stand-in (e.g. a system-wide install)."""
    if (ROOT / ".venv" / "bin" / "nitro-netd").exists():
        return ROOT
    script = Path(sys.executable).with_name("nitro-netd")
    found = str(script) if script.exists() else shutil.which("nitro-netd")
    assert found, "nitro-netd is not installed for this interpreter"
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    bindir = shlex.quote(str(Path(found).parent))
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'PATH={bindir}:"$PATH"\n')
    return tmp_path


@pytest.mark.netns("curl")
@pytest.mark.timeout(120)
def test_readme_simulator_example_works_verbatim(tmp_path: Path) -> None:
    script = _readme_simulator_example()

    result = subprocess.run(
        ["bash", "-e", "-x", "-c", script],
        cwd=_venv_root(tmp_path),
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    _remove_named_in(result.stdout + result.stderr)
    names = re.findall(r"^\+ sim=(nnd-[0-9a-f]{6})$", result.stderr, re.MULTILINE)

    assert result.returncode == 0, result.stdout + result.stderr
    assert len(names) == 1, result.stderr
    assert "HTTP/1.0 200 OK" in result.stdout
    assert re.search(r"^\s+link\s+up for", result.stdout, re.MULTILINE), result.stdout
    assert re.search(rf"^{names[0]}\s+detached", result.stdout, re.MULTILINE), result.stdout
    _assert_removed(names[0])


WRAPPER = """
import signal, sys
# As at a terminal: a CI job started in the background inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
from nitro_netd.cli.umbrella import main
sys.exit(main(sys.argv[1:]))
"""

SLOW_TO_STOP = """
import pathlib, signal, sys, time
marker, ready = map(pathlib.Path, sys.argv[1:])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
ready.touch()
codes = [signal.sigwaitinfo({signal.SIGINT}).si_code]
deadline = time.monotonic() + 1.0  # cleaning up; a second SIGINT meanwhile is recorded
while (left := deadline - time.monotonic()) > 0:
    info = signal.sigtimedwait({signal.SIGINT}, left)
    if info is not None:
        codes.append(info.si_code)
marker.write_text(" ".join(map(str, codes)))
sys.exit(7)
"""
"""Traps SIGINT, then takes a second to write MARKER (the si_code of each SIGINT) and exit 7."""


def _exec_slow_to_stop(sim: Simulator, tmp_path: Path) -> tuple[list[str], Path, Path]:
    marker, ready = tmp_path / "marker", tmp_path / "ready"
    argv = [
        sys.executable, "-c", WRAPPER, "sim", "exec", sim.name, "world", "--",
        sys.executable, "-c", SLOW_TO_STOP, str(marker), str(ready),
    ]  # fmt: skip
    return argv, marker, ready


def _finish(child: subprocess.Popen[bytes]) -> int:
    try:
        return child.wait(timeout=INTERRUPT_GRACE + 5)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("to_group", [False, True], ids=["to-its-pid", "to-its-process-group"])
def test_sim_exec_passes_sigint_on_and_waits_for_the_command(
    sim: Simulator, tmp_path: Path, to_group: bool
) -> None:
    argv, marker, ready = _exec_slow_to_stop(sim, tmp_path)
    child = subprocess.Popen(argv, start_new_session=True)
    try:
        wait_until(sim, ready.exists, 10, "the command in the world namespace started")
        if to_group:
            os.killpg(child.pid, signal.SIGINT)
        else:
            child.send_signal(signal.SIGINT)
    finally:
        status = _finish(child)

    assert marker.exists(), "the command was killed before it had cleaned up"
    assert status == 7


@pytest.mark.netns("setsid")
def test_sim_exec_passes_the_terminals_ctrl_c_once(sim: Simulator, tmp_path: Path) -> None:
    argv, marker, ready = _exec_slow_to_stop(sim, tmp_path)
    terminal, tty = os.openpty()
    # The terminal's ^C goes to its whole foreground process group, the command included.
    child = subprocess.Popen(["setsid", "--ctty", *argv], stdin=tty, stdout=tty, stderr=tty)
    os.close(tty)
    try:
        wait_until(sim, ready.exists, 10, "the command in the world namespace started")
        os.write(terminal, b"\x03")
    finally:
        status = _finish(child)
        os.close(terminal)

    assert marker.exists(), "the command was killed before it had cleaned up"
    assert marker.read_text() == str(SI_KERNEL), "SIGINT from the terminal, and only that"
    assert status == 7


def test_sim_exec_kills_what_the_command_started_when_the_grace_is_over(
    sim: Simulator, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    argv = [
        sys.executable, "-c", WRAPPER, "sim", "exec", sim.name, "world", "--",
        *stubborn_argv(pid_file),
    ]  # fmt: skip
    child = subprocess.Popen(argv, start_new_session=True)
    try:
        wait_until(sim, pid_file.exists, 10, "the command in the world namespace started")
        child.send_signal(signal.SIGINT)
    finally:
        status = _finish(child)
    stray = int(pid_file.read_text())
    try:
        wait_until(sim, lambda: not alive(stray), 5, "the command's child was killed")
    finally:
        if alive(stray):
            os.kill(stray, signal.SIGKILL)

    assert status == 128 + signal.SIGKILL


@pytest.mark.parametrize(
    ("command", "status", "message"),
    [
        ("/nonexistent/cmd", 127, "/nonexistent/cmd: command not found"),
        ("nitro-netd-no-such-command", 127, "nitro-netd-no-such-command: command not found"),
        ("/etc/passwd", 126, "/etc/passwd: permission denied"),
    ],
    ids=["missing-path", "not-on-path", "not-executable"],
)
def test_sim_exec_exits_like_a_shell_for_a_command_it_cannot_run(
    sim: Simulator, capsys: pytest.CaptureFixture[str], command: str, status: int, message: str
) -> None:
    assert main(["sim", "exec", sim.name, "enclave", "--", command]) == status
    assert capsys.readouterr().err == f"nitro-netd: error: {message}\n"

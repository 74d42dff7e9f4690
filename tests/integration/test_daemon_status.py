"""The daemon in-process on unix sockets: status over the control socket, Prometheus
metrics, the pcap file, and CID pinning of links."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from nitro_netd.cli.status import (
    StatusError,
    daemon_running,
    query_status,
    render_status,
    resolve_name,
)
from nitro_netd.link import LinkProtocol
from nitro_netd.parent import DaemonConfig
from nitro_netd.parent.daemon import Daemon
from nitro_netd.parent.enclave_watch import EnclaveInfo
from nitro_netd.parent.lifecycle import StatePaths
from nitro_netd.parent.pcap import LINKTYPE_ETHERNET, PCAP_MAGIC
from nitro_netd.parent.session import LinkSession
from nitro_netd.transport import parse_endpoint
from tests.integration.test_parent_link import Agent, ping_roundtrip
from tests.support.link_agent import running
from tests.support.ports import free_port

TIMEOUT = 10.0


def make_config(tmp_path: Path, **extra: Any) -> DaemonConfig:
    return DaemonConfig(
        listen=parse_endpoint(f"unix://{tmp_path}/link.sock"),
        name="app",
        state=StatePaths(tmp_path / "state", "app"),
        **extra,
    )


async def status_after_a_ping(tmp_path: Path, config: DaemonConfig) -> dict[str, Any]:
    """Run the daemon, ping its gateway once over a link, and return its status."""
    assert config.state is not None
    async with running(config):
        agent = await Agent.connect(tmp_path / "link.sock", LinkProtocol.GVPROXY)
        await ping_roundtrip(agent)
        status = await asyncio.to_thread(query_status, config.state)
        agent.close()
    return status


async def test_status_reports_link_counters_and_flows_over_control_socket(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert config.state is not None
    status = await status_after_a_ping(tmp_path, config)

    assert status["name"] == "app"
    assert status["link"]["up"] is True
    assert status["link"]["peer"] == "unix peer"
    assert status["link"]["accepted"] == 1
    assert status["counters"]["frames_in"] >= 1
    assert status["counters"]["frames_out"] >= 1
    assert set(status["flows"]) == {"icmp", "tcp", "udp"}
    assert status["enclave"]["following"] is False
    assert "link          up for" in render_status(status, now=status["time"])
    assert status["busy_poll"]["window_us"] == 50
    assert status["busy_poll"]["windows"] >= 1, "the ping's flushes never kicked the poller"
    assert status["busy_poll"]["seconds"] > 0
    assert not config.state.control.exists(), "control socket left behind"


async def test_busy_poll_zero_leaves_the_loop_sleeping(tmp_path: Path) -> None:
    status = await status_after_a_ping(tmp_path, make_config(tmp_path, busy_poll=0.0))
    assert status["busy_poll"] == {"window_us": 0, "seconds": 0.0, "windows": 0}


async def test_status_of_a_stopped_daemon_is_a_clear_error(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path, "gone")
    with pytest.raises(StatusError, match="no nitro-netd-parent is running for 'gone'"):
        await asyncio.to_thread(query_status, paths)


async def http_get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.splitlines()[0], body


async def test_metrics_serve_prometheus_text_from_the_same_snapshot(tmp_path: Path) -> None:
    port = free_port()
    async with running(make_config(tmp_path, metrics_listen=("127.0.0.1", port))):
        agent = await Agent.connect(tmp_path / "link.sock", LinkProtocol.GVPROXY)
        await ping_roundtrip(agent)
        status_line, body = await http_get(port, "/metrics")
        missing, _ = await http_get(port, "/")
        agent.close()

    assert status_line == "HTTP/1.1 200 OK"
    assert "nitro_netd_link_up 1" in body
    assert 'nitro_netd_frames_total{direction="from_enclave"}' in body
    assert 'nitro_netd_flows{protocol="tcp"} 0' in body
    assert missing == "HTTP/1.1 404 Not Found"


async def test_pcap_records_link_frames_both_ways(tmp_path: Path) -> None:
    pcap = tmp_path / "link.pcap"
    async with running(make_config(tmp_path, pcap=pcap)):
        agent = await Agent.connect(tmp_path / "link.sock", LinkProtocol.GVPROXY)
        await ping_roundtrip(agent)
        agent.close()

    data = pcap.read_bytes()
    magic, _major, _minor, _zone, _sigfigs, _snaplen, linktype = struct.unpack_from(
        "=IHHiIII", data
    )
    assert (magic, linktype) == (PCAP_MAGIC, LINKTYPE_ETHERNET)
    frames = []
    offset = 24
    while offset < len(data):
        _sec, _usec, captured, original = struct.unpack_from("=IIII", data, offset)
        frames.append(data[offset + 16 : offset + 16 + captured])
        assert captured == original
        offset += 16 + captured
    assert len(frames) == 2, "the echo request and its reply"
    assert all(frame[12:14] == b"\x08\x00" for frame in frames)  # IPv4


class _Session:
    peer = "cid 17 port 5000"


async def test_link_from_another_cid_is_refused_and_the_enclaves_accepted(tmp_path: Path) -> None:
    config = make_config(tmp_path, nitro_cli="/bin/true")
    daemon = Daemon(config, asyncio.Event())
    assert daemon.watcher is not None
    session = cast(LinkSession, _Session())
    daemon.watcher.update(EnclaveInfo("app", 16, "RUNNING"))

    assert daemon.admit(session, 16) is None
    refusal = daemon.admit(session, 17)
    assert refusal is not None
    assert "CID 17 is not enclave 'app' (CID 16)" in refusal
    assert daemon.admit(session, None) is None  # unix links are not pinned

    daemon.watcher.update(None)
    assert "not running" in (daemon.admit(session, 16) or "")


async def test_an_overlong_control_request_gets_an_error_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path)
    assert config.state is not None
    async with running(config):
        reader, writer = await asyncio.open_unix_connection(str(config.state.control))
        writer.write(b"x" * (1 << 17) + b"\n")  # past the stream reader's 64 KiB line limit
        async with asyncio.timeout(TIMEOUT):
            answer = await reader.readline()
        writer.close()
    assert answer == b'{"ok": false, "error": "request line too long"}\n'
    assert "Traceback" not in caplog.text


def failing_nitro_cli(tmp_path: Path) -> Path:
    """A nitro-cli that fails as the real one does: the error code, then a log file name."""
    fake = tmp_path / "nitro-cli"
    fake.write_text(
        "#!/bin/sh\n"
        "echo '[ E39 ] Enclave process connection failure.' >&2\n"
        "echo >&2\n"
        'echo "If you open a support ticket, please provide the error log found at'
        ' \\"/var/log/nitro_enclaves/err$$.log\\"" >&2\n'
        "exit 1\n"
    )
    fake.chmod(0o755)
    return fake


async def test_status_shows_why_nitro_cli_fails(tmp_path: Path) -> None:
    config = make_config(tmp_path, nitro_cli=str(failing_nitro_cli(tmp_path)))
    assert config.state is not None
    async with running(config):
        status = await asyncio.to_thread(query_status, config.state)
    error = status["enclave"]["error"]
    assert error.endswith("describe-enclaves exited 1: [ E39 ] Enclave process connection failure.")
    assert "nitro-cli     failing: " in render_status(status, now=status["time"])


async def test_status_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`nitro-netd status --json | head -1`: the reader goes away; no traceback."""
    config = make_config(tmp_path)
    assert config.state is not None
    argv = [sys.executable, "-m", "nitro_netd.cli.status", "--state-dir", str(tmp_path / "state")]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        async with running(config):
            results = [
                await asyncio.to_thread(
                    subprocess.run, [*argv, *extra], stdout=write_end, stderr=subprocess.PIPE,
                    text=True, timeout=TIMEOUT,
                )
                for extra in (["--json"], [])
            ]  # fmt: skip
    finally:
        os.close(write_end)
    for result in results:
        assert (result.returncode, result.stderr) == (0, "")


async def test_status_of_an_unnamed_daemon_says_where_its_state_is(tmp_path: Path) -> None:
    state = StatePaths(tmp_path / "state", "default")
    config = DaemonConfig(listen=parse_endpoint(f"unix://{tmp_path}/link.sock"), state=state)
    async with running(config):
        assert await asyncio.to_thread(resolve_name, state.root, None) == "default"
        status = await asyncio.to_thread(query_status, state)
    assert status["name"] is None
    assert status["state_dir"] == str(state.directory)
    assert render_status(status, now=status["time"]).splitlines()[0] == (
        f"nitro-netd-parent (no --enclave-name; state in {state.directory})"
    )


async def test_a_liveness_probe_gets_no_reply_and_the_daemon_still_answers(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    assert config.state is not None
    async with running(config):
        assert await asyncio.to_thread(daemon_running, config.state)
        reader, writer = await asyncio.open_unix_connection(str(config.state.control))
        writer.write_eof()  # what the probe does: connect, send nothing, close
        async with asyncio.timeout(TIMEOUT):
            reply = await reader.read()
        writer.close()
        status = await asyncio.to_thread(query_status, config.state)
    assert reply == b""
    assert status["name"] == "app"


def test_a_dead_pid_or_a_plain_file_for_a_socket_is_not_a_running_daemon(
    tmp_path: Path,
) -> None:
    paths = StatePaths(tmp_path, "app")
    paths.directory.mkdir()
    paths.control.touch()  # a plain file: connect(2) is refused
    assert not daemon_running(paths)
    paths.pidfile.write_text(f"{2**22 + 1}\n")  # above any pid_max: no such process
    assert not daemon_running(paths)
    paths.control.unlink()
    assert not daemon_running(paths)

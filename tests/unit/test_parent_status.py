"""Status rendering (table and Prometheus), the control protocol's answers, flow counts."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from nitro_netd.cli.status import (
    StatusError,
    format_duration,
    query_status,
    render_status,
    resolve_name,
)
from nitro_netd.parent.control import ControlServer, flow_count
from nitro_netd.parent.lifecycle import StatePaths
from nitro_netd.parent.metrics import MetricsServer, parse_metrics_listen, render_metrics

NOW = 1_800_000_000.0


def sample_status(**link: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "name": "app",
        "state_dir": "/run/nitro-netd/app",
        "pid": 4242,
        "started": NOW - 3725,
        "uptime": 3725.4,
        "listen": "vsock://:1024",
        "link": {"up": True, "peer": "cid 16 port 3000", "cid": 16, "since": NOW - 65,
                 "accepted": 2, "refused": 1, **link},
        "enclave": {"name": "app", "following": True, "nitro_cli": "/usr/bin/nitro-cli",
                    "cid": 16, "state": "RUNNING"},
        "exposed": [{"protocol": "tcp", "parent_port": 8080, "enclave_port": 80}],
        "flows": {"icmp": 0, "tcp": 3, "udp": 1},
        "counters": {"frames_in": 10, "bytes_in": 1000, "frames_out": 12, "bytes_out": 2000,
                     "drops": {"bad_checksum": 2}},
        "pcap": None,
        "busy_poll": {"window_us": 50, "seconds": 1.25, "windows": 300},
        "splice": {"enabled": True, "limit": 1, "flows": 4, "stopped": 2, "bytes": 123456},
        "time": NOW,
    }  # fmt: skip


def test_render_status_table() -> None:
    assert render_status(sample_status(), now=NOW).splitlines() == [
        "nitro-netd-parent app",
        "  daemon        pid 4242, up 1h02m05s, listening on vsock://:1024",
        "  link          up for 1m05s, peer cid 16 port 3000; 2 accepted, 1 refused",
        "  enclave       app: CID 16, RUNNING (following with /usr/bin/nitro-cli)",
        "  exposed       tcp 8080->80",
        "  flows         icmp 0  tcp 3  udp 1",
        "  from enclave  10 frames, 1000 bytes",
        "  to enclave    12 frames, 2000 bytes",
        "  drops         bad_checksum 2",
        "  busy poll     50 µs windows, 1.250 s awake in 300 windows",
        "  splice        on (bulk-flow limit 1); 4 flows spliced, 2 went back to copying, 123456 bytes so far",
    ]


def test_render_status_busy_poll_off_and_absent() -> None:
    status = sample_status()
    status["busy_poll"] = {"window_us": 0, "seconds": 0.0, "windows": 0}
    assert "  busy poll     off" in render_status(status, now=NOW).splitlines()
    del status["busy_poll"]  # a daemon from before busy polling
    assert "busy poll" not in render_status(status, now=NOW)


def test_render_status_splice_off_and_absent() -> None:
    status = sample_status()
    status["splice"] = {"enabled": False, "limit": 0, "flows": 0, "bytes": 0}
    assert (
        "  splice        off; 0 flows spliced, 0 bytes so far"
        in render_status(status, now=NOW).splitlines()
    )
    del status["splice"]  # a daemon from before splicing
    assert "splice" not in render_status(status, now=NOW)


def test_render_status_link_down_shows_last_peer() -> None:
    text = render_status(sample_status(up=False), now=NOW)
    assert "link          down for 1m05s, last peer cid 16 port 3000" in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(4.2, "4s"), (65, "1m05s"), (3725, "1h02m05s"), (90061, "1d01h01m")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_render_metrics_prometheus_text() -> None:
    status = sample_status()
    status["counters"]["tcp"] = {"fast_retransmits": 0, "timeouts": 3}
    lines = render_metrics(status).splitlines()
    assert "# TYPE nitro_netd_frames_total counter" in lines
    assert 'nitro_netd_frames_total{direction="from_enclave"} 10' in lines
    assert 'nitro_netd_bytes_total{direction="to_enclave"} 2000' in lines
    assert 'nitro_netd_drops_total{reason="bad_checksum"} 2' in lines
    assert 'nitro_netd_flows{protocol="tcp"} 3' in lines
    assert "nitro_netd_link_up 1" in lines
    assert "nitro_netd_links_refused_total 1" in lines
    assert "nitro_netd_busy_poll_seconds_total 1.25" in lines
    assert "nitro_netd_spliced_bytes_total 123456" in lines
    assert 'nitro_netd_tcp_recovery_total{event="timeouts"} 3' in lines


def test_render_status_shows_tcp_recovery_when_the_daemon_counts_it() -> None:
    status = sample_status()
    assert "tcp recovery" not in render_status(status, now=NOW)  # a daemon from before
    status["counters"]["tcp"] = {"fast_retransmits": 1, "timeouts": 3}
    assert (
        "  tcp recovery  fast_retransmits 1, timeouts 3"
        in render_status(status, now=NOW).splitlines()
    )


def test_render_metrics_keeps_every_digit_of_large_counters() -> None:
    status = sample_status()
    status["counters"]["bytes_in"] = 67_215_548_123
    lines = render_metrics(status).splitlines()
    assert 'nitro_netd_bytes_total{direction="from_enclave"} 67215548123' in lines
    assert "nitro_netd_uptime_seconds 3725.4" in lines


def test_metrics_http_answers() -> None:
    server = MetricsServer("127.0.0.1", 1, sample_status)
    assert server.answer(b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")
    assert server.answer(b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert server.answer(b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")


def test_metrics_head_gets_the_headers_of_a_get_and_no_body() -> None:
    server = MetricsServer("127.0.0.1", 1, sample_status)
    get = server.answer(b"GET /metrics HTTP/1.1\r\n\r\n")
    head = server.answer(b"HEAD /metrics HTTP/1.1\r\n\r\n")
    get_head, _, body = get.partition(b"\r\n\r\n")
    assert body
    assert head == get_head + b"\r\n\r\n"
    assert f"Content-Length: {len(body)}".encode() in head
    missing = server.answer(b"HEAD /other HTTP/1.1\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 404")
    assert missing.endswith(b"\r\n\r\n")


def test_render_status_shows_the_last_nitro_cli_error() -> None:
    status = sample_status()
    assert "nitro-cli" not in render_status(status, now=NOW).replace("with /usr/bin/nitro-cli", "")
    status["enclave"]["error"] = "nitro-cli describe-enclaves exited 1: [ E39 ] failure."
    lines = render_status(status, now=NOW).splitlines()
    assert lines[4] == (
        "  nitro-cli     failing: nitro-cli describe-enclaves exited 1: [ E39 ] failure."
    )


class _DeniedSocket:
    """A control socket connect(2) refuses with EACCES."""

    def __init__(self, *args: object) -> None:
        pass

    def __enter__(self) -> _DeniedSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def settimeout(self, timeout: float) -> None:
        pass

    def connect(self, address: str) -> None:
        raise PermissionError(13, "Permission denied")


@pytest.mark.parametrize(("euid", "hint"), [(1000, " (try as root)"), (0, "")])
def test_a_denied_control_socket_suggests_root_only_to_others(
    monkeypatch: pytest.MonkeyPatch, euid: int, hint: str
) -> None:
    monkeypatch.setattr(socket, "socket", _DeniedSocket)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    paths = StatePaths(Path("/run/nitro-netd"), "app")
    with pytest.raises(StatusError) as raised:
        query_status(paths)
    assert str(raised.value) == f"cannot open {paths.control}: permission denied{hint}"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), (":9464", ("127.0.0.1", 9464)),
     ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::]:9464", ("::", 9464))],
)  # fmt: skip
def test_parse_metrics_listen(text: str, parsed: tuple[str, int]) -> None:
    assert parse_metrics_listen(text) == parsed


def test_control_answers_status_and_refuses_other_requests() -> None:
    server = ControlServer(Path("/nonexistent"), sample_status)
    assert server.answer(b"status\n") == {"ok": True, "status": sample_status()}
    reply = server.answer(b"shutdown\n")
    assert reply["ok"] is False
    assert "unknown request 'shutdown'" in reply["error"]
    json.dumps(reply)


class _WithCount:
    def flow_count(self) -> int:
        return 7


class _WithFlows:
    def __init__(self) -> None:
        self.flows = {1: "a", 2: "b"}


def test_flow_count_by_duck_typing() -> None:
    assert flow_count(_WithCount()) == 7
    assert flow_count(_WithFlows()) == 2
    assert flow_count(object()) == 0


def make_state(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir()
        (root / name / "control.sock").touch()


def test_resolve_name_picks_the_only_daemon(tmp_path: Path) -> None:
    def everyone(paths: StatePaths) -> bool:
        return True

    with pytest.raises(StatusError, match="no nitro-netd-parent is running under"):
        resolve_name(tmp_path, None, everyone)
    make_state(tmp_path, "app")
    assert resolve_name(tmp_path, None, everyone) == "app"
    make_state(tmp_path, "b")
    with pytest.raises(StatusError, match=r"several daemons run .*\(app, b\)"):
        resolve_name(tmp_path, None, everyone)
    assert resolve_name(tmp_path, "b", everyone) == "b"


def test_resolve_name_counts_only_live_daemons(tmp_path: Path) -> None:
    make_state(tmp_path, "a", "b", "c")
    assert resolve_name(tmp_path, None, lambda paths: paths.name == "b") == "b"
    with pytest.raises(StatusError, match=r"several daemons run .*\(a, c\): name one"):
        resolve_name(tmp_path, None, lambda paths: paths.name != "b")


def test_resolve_name_with_only_dead_daemons_says_none_runs(tmp_path: Path) -> None:
    make_state(tmp_path, "a", "b")
    with pytest.raises(StatusError) as raised:
        resolve_name(tmp_path, None, lambda paths: False)
    assert str(raised.value) == (
        f"no nitro-netd-parent is running under {tmp_path} (a, b: left by daemons that died)"
    )


def test_the_title_of_an_unnamed_daemon_says_where_its_state_is() -> None:
    status = sample_status()
    status["name"] = status["enclave"]["name"] = None
    status["state_dir"] = "/run/nitro-netd/default"
    title = render_status(status, now=NOW).splitlines()[0]
    assert title == "nitro-netd-parent (no --enclave-name; state in /run/nitro-netd/default)"
    del status["state_dir"]  # a daemon from before
    assert render_status(status, now=NOW).splitlines()[0] == (
        "nitro-netd-parent (no --enclave-name)"
    )

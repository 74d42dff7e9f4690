"""The daemon's lifecycle flags, state paths and single-instance pidfile lock."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from nitro_netd.cli.parent import build_config, build_parser
from nitro_netd.parent.daemon import DaemonConfig
from nitro_netd.parent.host_tcp import SPLICE_FLOWS
from nitro_netd.parent.lifecycle import (
    DEFAULT_STATE_ROOT,
    AlreadyRunning,
    LifecycleError,
    PidLock,
    StatePaths,
    check_name,
    create_state_dir,
    pid_alive,
    read_pid,
)
from nitro_netd.transport import Scheme


def config(*argv: str) -> DaemonConfig:
    return build_config(build_parser().parse_args(list(argv)))


def fake_nitro_cli(tmp_path: Path) -> Path:
    path = tmp_path / "nitro-cli"
    path.write_text("#!/bin/sh\necho '[]'\n")
    path.chmod(0o755)
    return path


def test_defaults_keep_vsock_listener_and_no_state() -> None:
    c = config()
    assert c.listen.scheme is Scheme.VSOCK
    assert c.listen.port == 1024
    assert (c.name, c.state, c.nitro_cli, c.pcap, c.metrics_listen) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert c.exit_with_enclave is False


def test_enclave_name_puts_state_under_run_nitro_netd() -> None:
    c = config("--enclave-name", "app", "--nitro-cli", "/bin/true")
    assert c.state == StatePaths(DEFAULT_STATE_ROOT, "app")
    assert c.state.pidfile == Path("/run/nitro-netd/app/parent.pid")
    assert c.state.control == Path("/run/nitro-netd/app/control.sock")
    assert c.nitro_cli == "/bin/true"


def test_state_dir_overrides_the_root_and_daemonize_alone_uses_default(tmp_path: Path) -> None:
    c = config("--daemonize", "--state-dir", str(tmp_path))
    assert c.state == StatePaths(tmp_path, "default")


def test_lifecycle_flags_are_parsed(tmp_path: Path) -> None:
    cli = fake_nitro_cli(tmp_path)
    c = config(
        "--enclave-name", "app", "--nitro-cli", str(cli), "--enclave-poll", "0.5",
        "--exit-with-enclave", "--pcap", "x.pcap", "--metrics-listen", "[::1]:9464",
    )  # fmt: skip
    assert c.exit_with_enclave is True
    assert c.enclave_poll == 0.5
    assert c.pcap == Path("x.pcap").absolute()
    assert c.metrics_listen == ("::1", 9464)
    assert c.nitro_cli == str(cli)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--exit-with-enclave",), "needs --enclave-name"),
        (("--enclave-name", "a", "--exit-with-enclave", "--nitro-cli", "/nope"), "--exit-with-enclave needs nitro-cli"),
        (("--enclave-name", "a", "--nitro-cli", "/nope"), "not an executable"),
        (("--enclave-name", "a/b"), "--enclave-name 'a/b'"),
        (("--enclave-name", ".hidden"), "starting with a letter or digit"),
        (("--enclave-name", ""), "--enclave-name '': use 1-64 letters"),
        (("--enclave-poll", "0"), "--enclave-poll must be a number of seconds above 0"),
        (("--connect-timeout", "inf"), "--connect-timeout must be a number of seconds"),
        (("--udp-timeout", "1e308"), "--udp-timeout must be a number of seconds"),
        (("--udp-timeout", "nan"), "--udp-timeout must be a number of seconds"),
        (("--metrics-listen", "9464"), "expected HOST:PORT"),
        (("--metrics-listen", "h:99999"), "expected HOST:PORT"),
    ],
)  # fmt: skip
def test_bad_lifecycle_flags_are_rejected_naming_the_flag(
    argv: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        config(*argv)


def test_pcap_size_limit_defaults_to_a_gibibyte_and_zero_lifts_it() -> None:
    assert config("--pcap", "x.pcap").pcap_max_bytes == 1 << 30
    assert config("--pcap", "x.pcap", "--pcap-max-mb", "5").pcap_max_bytes == 5 << 20
    assert config("--pcap", "x.pcap", "--pcap-max-mb", "0").pcap_max_bytes is None


@pytest.mark.parametrize("value", ["-1", "1.5", "lots"])
def test_bad_pcap_size_limits_are_rejected(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--pcap-max-mb", value])
    assert "--pcap-max-mb" in capsys.readouterr().err


def test_busy_poll_defaults_to_50_microseconds_and_zero_turns_it_off() -> None:
    assert config().busy_poll == pytest.approx(50e-6)
    assert config("--busy-poll-us", "200").busy_poll == pytest.approx(200e-6)
    assert config("--busy-poll-us", "0").busy_poll == 0


@pytest.mark.parametrize("value", ["-1", "2.5", "10001", "soon"])
def test_bad_busy_poll_windows_are_rejected(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--busy-poll-us", value])
    assert "--busy-poll-us" in capsys.readouterr().err


def test_every_bulk_flow_splices_by_default_and_zero_turns_splicing_off() -> None:
    assert config().splice_flows == SPLICE_FLOWS == 1024
    assert config("--splice-flows", "4").splice_flows == 4
    assert config("--splice-flows", "0").splice_flows == 0


@pytest.mark.parametrize("value", ["-1", "1.5", "1025", "all"])
def test_bad_splice_flow_limits_are_rejected(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--splice-flows", value])
    assert "--splice-flows" in capsys.readouterr().err


def test_check_name_accepts_ordinary_names() -> None:
    assert check_name("my-enclave_1.prod") == "my-enclave_1.prod"


def test_pidlock_writes_pid_and_refuses_a_second_holder(tmp_path: Path) -> None:
    path = tmp_path / "app" / "parent.pid"
    lock = PidLock.acquire(path, "app")
    assert read_pid(path) == os.getpid()

    with pytest.raises(AlreadyRunning, match=rf"already running \(pid {os.getpid()}, lock on"):
        PidLock.acquire(path, "app")
    with pytest.raises(AlreadyRunning):
        PidLock.check(path, "app")

    lock.release()
    lock.release()
    assert not path.exists()
    assert not path.parent.exists(), "the empty state dir is removed too"


def test_pidlock_takes_over_a_stale_pidfile(tmp_path: Path) -> None:
    path = tmp_path / "parent.pid"
    path.write_text("999999\n")
    PidLock.check(path, "app")
    lock = PidLock.acquire(path, "app")
    assert read_pid(path) == os.getpid()
    lock.release()


def test_pid_alive_is_false_only_for_a_missing_process() -> None:
    assert pid_alive(os.getpid())
    assert pid_alive(1)  # init: alive, whoever we are
    assert not pid_alive(2**22 + 1)  # above the kernel's largest pid_max


def test_read_pid_of_missing_or_garbage_file_is_none(tmp_path: Path) -> None:
    assert read_pid(tmp_path / "none") is None
    (tmp_path / "bad").write_text("x")
    assert read_pid(tmp_path / "bad") is None


def test_daemon_raises_its_open_files_limit_towards_the_flow_limits() -> None:
    import resource

    from nitro_netd.parent.daemon import raise_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, soft), hard))
        wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
        assert raise_file_limit(wanted) >= wanted
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= wanted
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_start_up_os_errors_name_the_file_and_what_to_try(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nitro_netd.cli.parent import _describe_os_error

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    denied = PermissionError(13, "Permission denied", "/run/nitro-netd/app/parent.pid")
    assert _describe_os_error(denied) == (
        "/run/nitro-netd/app/parent.pid: Permission denied"
        " (run as root, or pass --state-dir DIR to a directory you may write)"
    )
    assert _describe_os_error(NotADirectoryError(20, "Not a directory", "/etc/passwd/x")) == (
        "/etc/passwd/x: Not a directory"
    )
    assert _describe_os_error(OSError(98, "Address already in use")) == "Address already in use"


def test_permission_advice_never_says_run_as_root_to_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from nitro_netd.cli.parent import _describe_os_error

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    denied = PermissionError(13, "Permission denied", "/run/nitro-netd/app/parent.pid")
    assert _describe_os_error(denied) == (
        "/run/nitro-netd/app/parent.pid: Permission denied"
        " (pass --state-dir DIR to a directory you may write)"
    )

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(LifecycleError) as raised:
        create_state_dir(tmp_path / "app")
    assert "run as root" not in str(raised.value)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LifecycleError, match="run as root, or pass --state-dir"):
        create_state_dir(tmp_path / "app")


def test_an_unmakeable_state_dir_is_named_as_the_state_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    root = tmp_path / "file" / "state"
    with pytest.raises(LifecycleError) as raised:
        PidLock.acquire(StatePaths(root, "app").pidfile, "app")
    assert str(raised.value) == f"cannot create state directory {root}/app: Not a directory"


def test_an_empty_state_dir_is_refused_at_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--state-dir", ""])
    assert exited.value.code == 2
    assert "argument --state-dir: must not be empty" in capsys.readouterr().err


def test_a_relative_log_file_is_made_absolute_before_daemonizing_changes_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["--daemonize", "--log-file", "logs/parent.log"])
    assert args.log_file == tmp_path / "logs" / "parent.log"


def test_the_open_files_limit_wanted_grows_with_the_exposed_ports() -> None:
    from nitro_netd.parent.daemon import files_wanted

    none = config("--state-dir", "/tmp/x")
    ranged = config("--state-dir", "/tmp/x", "-e", "10000-40000", "-e", "udp:53")
    assert files_wanted(ranged) == files_wanted(none) + 30002
    assert files_wanted(none) > none.stack.max_tcp_flows + none.stack.max_udp_flows


def test_the_open_files_limit_wanted_has_room_for_the_pipes_of_splicing_flows() -> None:
    from nitro_netd.parent.daemon import FILES_PER_SPLICING_FLOW, files_wanted

    spliced = config("--state-dir", "/tmp/x", "--splice-flows", "1000")
    copied = config("--state-dir", "/tmp/x", "--splice-flows", "0")
    assert files_wanted(spliced) == files_wanted(copied) + 1000 * FILES_PER_SPLICING_FLOW

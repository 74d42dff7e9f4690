"""``nitro-netd-enclave`` command-line parsing (no network, no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nitro_netd.cli import enclave as cli
from nitro_netd.enclave.netconfig import NetConfigError
from nitro_netd.link import DEFAULT_MTU, LinkProtocol
from nitro_netd.transport import Scheme


def test_cli_defaults() -> None:
    options = cli.parse_args([])
    assert str(options.agent.endpoint) == "vsock://3:1024"
    assert options.agent.protocol is LinkProtocol.GVPROXY
    assert options.agent.mtu == options.plan.mtu == DEFAULT_MTU == 65520
    assert options.plan.name == "tap0"
    assert options.plan.txqueuelen == 10000
    assert options.resolv_conf == "/etc/resolv.conf"
    assert options.command is None


def test_cli_default_mtu_matches_the_netstack() -> None:
    """link.DEFAULT_MTU duplicates the netstack's so that the agent never imports it."""
    from nitro_netd.netstack.config import DEFAULT_MTU as NETSTACK_DEFAULT_MTU

    assert DEFAULT_MTU == NETSTACK_DEFAULT_MTU


def test_cli_all_options() -> None:
    options = cli.parse_args(
        ["--parent", "unix:///run/p.sock", "--mtu", "1500", "--protocol", "qemu",
         "--tap", "nnd0", "--resolv-conf", "/tmp/r.conf", "--log-level", "debug"]
    )  # fmt: skip
    assert options.agent.endpoint.scheme is Scheme.UNIX
    assert options.agent.endpoint.path == "/run/p.sock"
    assert options.agent.protocol is LinkProtocol.QEMU
    assert (options.agent.mtu, options.plan.mtu, options.plan.name) == (1500, 1500, "nnd0")
    assert options.resolv_conf == "/tmp/r.conf"
    assert options.log_level == "debug"


def test_cli_no_resolv_conf() -> None:
    assert cli.parse_args(["--no-resolv-conf"]).resolv_conf is None


def test_cli_run_form_with_separator() -> None:
    options = cli.parse_args(["run", "--link-timeout", "5", "--", "sh", "-c", "exit 3"])
    assert options.command == ("sh", "-c", "exit 3")
    assert options.link_timeout == 5.0


def test_cli_run_form_command_options_are_not_ours() -> None:
    options = cli.parse_args(["run", "--mtu", "9001", "--", "curl", "--mtu", "x"])
    assert options.command == ("curl", "--mtu", "x")
    assert options.plan.mtu == 9001


def test_cli_run_form_after_options() -> None:
    options = cli.parse_args(
        ["--parent", "unix:///p.sock", "run", "--link-timeout", "2", "--", "sh"]
    )
    assert options.command == ("sh",)
    assert options.agent.endpoint.path == "/p.sock"
    assert options.link_timeout == 2.0


@pytest.mark.parametrize(
    ("argv", "index"),
    [
        (["run"], 0),
        (["--tap", "run"], None),
        (["--tap", "run", "run"], 2),
        (["--no-resolv-conf", "run"], 1),
        (["--mtu=9000", "run"], 1),
        (["--", "run"], None),
        (["other"], None),
    ],
)
def test_cli_finds_run_among_options(argv: list[str], index: int | None) -> None:
    assert cli.find_subcommand(argv) == index


def test_cli_run_form_without_separator() -> None:
    options = cli.parse_args(["run", "--tap", "t1", "python3", "-V"])
    assert options.command == ("python3", "-V")
    assert options.link_timeout == cli.DEFAULT_LINK_TIMEOUT


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--parent", "tcp://1.2.3.4:1"], "unknown transport"),
        (["--parent", "unix://relative"], "must be absolute"),
        (["--parent", "vsock://:1024"], "use vsock://3:1024"),
        (["--mtu", "65522"], "whole number from 576 to 65521"),
        (["--mtu", "big"], "whole number from 576 to 65521"),
        (["--protocol", "udp"], "invalid choice"),
        (["--tap", "a-very-long-interface-name"], "interface name"),
        (["--resolv-conf", "/x", "--no-resolv-conf"], "not allowed with"),
        (["--link-up-fd", "999"], "not open"),
        (["run"], "run needs a command"),
        (["run", "--link-timeout", "0", "--", "true"], "must be positive"),
        (["run", "--"], "run needs a command"),
    ],
)
def test_cli_bad_input_is_one_line_error_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert message in error_lines[0]


def test_cli_help_exits_0_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "run -- python3 app.py" in out


def test_cli_run_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--help"]) == 0
    assert "--link-timeout" in capsys.readouterr().out


def test_cli_exit_status_of_killed_command() -> None:
    assert cli._shell_status(0) == 0
    assert cli._shell_status(3) == 3
    assert cli._shell_status(-15) == 143


def test_cli_offload_is_asked_for_by_default() -> None:
    assert cli.parse_args([]).agent.offload is True


def test_cli_no_offload() -> None:
    assert cli.parse_args(["--no-offload"]).agent.offload is False
    options = cli.parse_args(["run", "--no-offload", "--", "true"])
    assert options.agent.offload is False
    assert options.command == ("true",)


def test_cli_tso_is_asked_for_by_default() -> None:
    assert cli.parse_args([]).agent.tso is True


def test_cli_no_tso() -> None:
    options = cli.parse_args(["--no-tso"])
    assert (options.agent.offload, options.agent.tso) == (True, False)
    options = cli.parse_args(["run", "--no-tso", "--", "true"])
    assert options.agent.tso is False
    assert options.command == ("true",)
    assert cli.find_subcommand(["--no-tso", "run", "--", "true"]) == 1


def test_cli_help_lists_no_tso(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "--no-tso" in capsys.readouterr().out


def test_cli_resolv_conf_in_a_missing_directory_fails_at_start_before_the_tap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def bring_up(*args: object, **kwargs: object) -> int:
        raise AssertionError("the TAP was created for a resolv.conf that cannot be written")

    monkeypatch.setattr(cli, "bring_up_network", bring_up)
    missing = tmp_path / "no-such-dir" / "resolv.conf"
    assert cli.main(["--resolv-conf", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1
    assert f"the directory {missing.parent} does not exist" in err
    assert not missing.parent.exists()


def test_cli_unix_parent_path_too_long_for_a_socket_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to be retried for ever; now it is a usage error naming the limit."""

    def bring_up(*args: object, **kwargs: object) -> int:
        raise AssertionError("the agent started with a path no socket can have")

    monkeypatch.setattr(cli, "bring_up_network", bring_up)
    assert cli.main(["--parent", "unix:///" + "p" * 120]) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert "121 bytes, longer than the 107" in error_lines[0]


def test_cli_replacing_a_default_route_is_asked_for_explicitly() -> None:
    assert cli.parse_args([]).replace_default_route is False
    assert cli.parse_args(["--replace-default-route"]).replace_default_route is True
    run = cli.parse_args(["run", "--replace-default-route", "--", "true"])
    assert (run.replace_default_route, run.command) == (True, ("true",))


def test_cli_default_routes_that_cannot_be_read_keep_the_agent_from_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unknown routes count as present: the agent must not take them over unasked."""

    def unreadable() -> list[object]:
        raise NetConfigError("cannot read the default routes: EPERM")

    monkeypatch.setattr(cli, "read_default_routes", unreadable)
    refused = cli._routes_to_put_back(cli.parse_args([]))
    assert isinstance(refused, str)
    assert "cannot read the default routes" in refused
    assert "--replace-default-route" in refused
    assert cli._routes_to_put_back(cli.parse_args(["--replace-default-route"])) == []

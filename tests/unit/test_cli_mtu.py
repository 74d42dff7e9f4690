"""``--mtu``: one validator and one message for the daemon, the agent, the demo and the
simulator (no simulator is built for a bad value)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from nitro_netd import link
from nitro_netd.cli import enclave as enclave_cli
from nitro_netd.cli import parent as parent_cli
from nitro_netd.cli import umbrella
from nitro_netd.cli.common import mtu_argument
from nitro_netd.netstack import config as netstack_config

MESSAGE = "give a whole number from 576 to 65521 (MTU + 14 must fit the link's 2-byte frame length)"


@pytest.mark.parametrize(("text", "value"), [("576", 576), ("1500", 1500), ("65521", 65521)])
def test_mtu_argument_takes_576_to_65521(text: str, value: int) -> None:
    assert mtu_argument(text) == value


@pytest.mark.parametrize("text", ["575", "65522", "0", "-1500", "1500.0", "big", "", "1e3"])
def test_mtu_argument_refuses_anything_else_with_one_message(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as info:
        mtu_argument(text)
    assert str(info.value) == f"invalid MTU {text!r}: {MESSAGE}"


def test_mtu_bounds_are_the_netstacks() -> None:
    """link.py repeats the netstack's bounds so that the agent never imports the netstack."""
    assert (link.MIN_MTU, link.MAX_MTU) == (netstack_config.MIN_MTU, netstack_config.MAX_MTU)


def run_cli(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """A command's exit status, also when argparse leaves by SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


@pytest.fixture
def nothing_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command got past its arguments: built a simulator, made a TAP (in
    this machine's namespace) or ran the daemon."""

    def started(*args: object, **kwargs: object) -> int:
        raise AssertionError("a command started with a bad --mtu")

    monkeypatch.setattr(umbrella, "demo", started)
    monkeypatch.setattr(umbrella, "require_host", started)
    monkeypatch.setattr(enclave_cli, "bring_up_network", started)
    monkeypatch.setattr(parent_cli, "run", started)


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (parent_cli.main, ["--listen", "unix:///tmp/nnd-test.sock"]),
        (enclave_cli.main, []),
        (umbrella.main, ["demo"]),
        (umbrella.main, ["sim", "up", "--bridge"]),
    ],
    ids=["nitro-netd-parent", "nitro-netd-enclave", "demo", "sim-up"],
)
@pytest.mark.parametrize("value", ["70000", "100", "big"])
@pytest.mark.usefixtures("nothing_started")
def test_every_command_refuses_a_bad_mtu_with_the_same_message(
    main: Callable[[list[str]], int],
    argv: list[str],
    value: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_cli(main, [*argv, "--mtu", value]) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert error_lines[0].endswith(f"argument --mtu: invalid MTU {value!r}: {MESSAGE}")


def test_demo_gets_a_good_mtu(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int | None] = []

    def demo(mtu: int | None) -> int:
        seen.append(mtu)
        return 0

    monkeypatch.setattr(umbrella, "demo", demo)
    assert umbrella.main(["demo", "--mtu", "1500"]) == 0
    assert umbrella.main(["demo"]) == 0
    assert seen == [1500, None]


@pytest.mark.usefixtures("nothing_started")
def test_sim_up_mtu_needs_the_bridge(capsys: pytest.CaptureFixture[str]) -> None:
    assert umbrella.main(["sim", "up", "--mtu", "1500"]) == 2
    assert "--mtu is the daemon's and the agent's: it needs --bridge" in capsys.readouterr().err

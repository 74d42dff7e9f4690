"""Bringing the enclave's network up once: IPv6 off on the TAP (no device, no root)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from nitro_netd.enclave import netconfig, setup
from nitro_netd.enclave.netconfig import InterfacePlan, disable_ipv6

PLAN = InterfacePlan(name="tap0", mtu=1500)


@pytest.fixture
def proc_sys(tmp_path: Path) -> Path:
    """A stand-in for /proc/sys with tap0's IPv6 settings, IPv6 on."""
    conf = tmp_path / "net" / "ipv6" / "conf" / "tap0"
    conf.mkdir(parents=True)
    (conf / "disable_ipv6").write_text("0\n")
    return tmp_path


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch, proc_sys: Path) -> list[str]:
    """Replace the netlink step; record it, with tap0's IPv6 setting at that moment."""
    done: list[str] = []
    setting = proc_sys / "net" / "ipv6" / "conf" / "tap0" / "disable_ipv6"

    def configure(plan: InterfacePlan) -> None:
        done.append(f"configure {plan.name} (disable_ipv6={setting.read_text().strip()})")

    monkeypatch.setattr(setup, "configure_interface", configure)
    return done


def fake_tap(name: str) -> int:
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    return read_fd


def test_bring_up_turns_ipv6_off_on_the_tap_before_it_comes_up(
    proc_sys: Path, steps: list[str]
) -> None:
    """The bridge carries IPv4 only: tap0's IPv6 link-local chatter would only be dropped
    by the parent (as unsupported_ethertype), on every start."""
    fd = setup.bring_up_network(PLAN, None, tap_opener=fake_tap, proc_sys=str(proc_sys))
    os.close(fd)
    assert (proc_sys / "net/ipv6/conf/tap0/disable_ipv6").read_text() == "1\n"
    assert steps == ["configure tap0 (disable_ipv6=1)"]


def test_bring_up_with_a_read_only_proc_sys_logs_and_carries_on(
    proc_sys: Path,
    steps: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def read_only(path: str, value: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(netconfig, "_write_sysctl", read_only)
    caplog.set_level(logging.DEBUG, logger="nitro_netd.enclave")
    fd = setup.bring_up_network(PLAN, None, tap_opener=fake_tap, proc_sys=str(proc_sys))
    os.close(fd)
    assert steps == ["configure tap0 (disable_ipv6=0)"]
    [record] = [r for r in caplog.records if "IPv6" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "cannot turn IPv6 off on tap0" in record.getMessage()
    assert "Read-only file system" in record.getMessage()


def test_disable_ipv6_without_ipv6_in_the_kernel_is_logged_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="nitro_netd.enclave")
    assert disable_ipv6("tap0", str(tmp_path)) is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_disable_ipv6_writes_the_interfaces_setting(proc_sys: Path) -> None:
    assert disable_ipv6("tap0", str(proc_sys)) is True
    assert (proc_sys / "net/ipv6/conf/tap0/disable_ipv6").read_text() == "1\n"

"""The agent's resolv.conf writer, on temporary paths."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nitro_netd.enclave.resolv import (
    ResolvConfError,
    check_resolv_conf,
    read_resolv_conf,
    render_resolv_conf,
    restore_resolv_conf,
    write_resolv_conf,
)

EXPECTED = "# written by nitro-netd-enclave\nnameserver 192.168.127.1\n"


def test_resolv_conf_text() -> None:
    assert render_resolv_conf() == EXPECTED


def test_resolv_conf_symlink_into_missing_directory_creates_it(tmp_path: Path) -> None:
    """The Nitro image quirk: /etc/resolv.conf -> /run/resolvconf/resolv.conf, no /run/resolvconf."""
    etc = tmp_path / "etc"
    etc.mkdir()
    target = tmp_path / "run" / "resolvconf" / "resolv.conf"
    link = etc / "resolv.conf"
    link.symlink_to(target)

    written = write_resolv_conf(str(link))

    assert written == str(target)
    assert link.is_symlink()
    assert target.read_text() == EXPECTED


def test_resolv_conf_symlink_into_missing_systemd_directory_creates_it(tmp_path: Path) -> None:
    """systemd-resolved images: /etc/resolv.conf -> ../run/systemd/resolve/stub-resolv.conf
    before resolved (or anything) made /run/systemd/resolve."""
    (tmp_path / "etc").mkdir()
    link = tmp_path / "etc" / "resolv.conf"
    link.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    target = tmp_path / "run" / "systemd" / "resolve" / "stub-resolv.conf"
    assert check_resolv_conf(str(link)) == str(target)
    assert write_resolv_conf(str(link)) == str(target)
    assert target.read_text() == EXPECTED


def test_resolv_conf_in_a_missing_directory_is_an_error_and_makes_nothing(
    tmp_path: Path,
) -> None:
    """A mistyped --resolv-conf: nothing reads a resolv.conf in a directory nobody made, so
    the agent must say so rather than make the directories and write it there."""
    path = tmp_path / "ect" / "netns" / "resolv.conf"
    for attempt in (check_resolv_conf, write_resolv_conf):
        with pytest.raises(ResolvConfError, match="does not exist") as info:
            attempt(str(path))
        assert str(tmp_path / "ect" / "netns") in str(info.value)
        assert "--no-resolv-conf" in str(info.value)
        assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["empty", "directory", "link to a directory"])
def test_resolv_conf_path_that_cannot_be_a_file_is_an_error_before_anything(
    tmp_path: Path, kind: str
) -> None:
    """These used to fail only when written, after the TAP and the default route were set
    up (which replaced a default route the agent then did not put back)."""
    path = {"empty": "", "directory": str(tmp_path), "link to a directory": str(tmp_path / "l")}
    (tmp_path / "l").symlink_to(tmp_path)
    with pytest.raises(ResolvConfError, match="--no-resolv-conf") as info:
        check_resolv_conf(path[kind])
    assert ("a file's path" if kind == "empty" else "it is a directory") in str(info.value)


def test_resolv_conf_that_nothing_may_write_is_an_error_before_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Root may write anywhere but on a read-only mount, which `access` reports: the test
    stands one in by answering `access` itself.)"""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ResolvConfError, match="permission denied"):
        check_resolv_conf(str(tmp_path / "resolv.conf"))


def test_resolv_conf_relative_symlink_is_followed(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    link = tmp_path / "etc" / "resolv.conf"
    link.symlink_to("../run/resolvconf/resolv.conf")
    write_resolv_conf(str(link))
    assert (tmp_path / "run" / "resolvconf" / "resolv.conf").read_text() == EXPECTED


def test_resolv_conf_plain_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 10.0.0.1\nsearch example.org\n")
    assert write_resolv_conf(str(path)) == str(path)
    assert path.read_text() == EXPECTED
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["resolv.conf"]  # no temporary left


def test_resolv_conf_missing_file_is_created(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    write_resolv_conf(str(path), nameserver="10.1.2.3")
    assert path.read_text().endswith("nameserver 10.1.2.3\n")


def test_resolv_conf_rename_refused_rewrites_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bind-mounted file (``ip netns exec``) cannot be renamed over: EBUSY."""
    path = tmp_path / "resolv.conf"
    path.write_text("old\n")

    def busy(src: str, dst: str) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr("nitro_netd.enclave.resolv.os.replace", busy)
    write_resolv_conf(str(path))
    assert path.read_text() == EXPECTED
    assert [p.name for p in tmp_path.iterdir()] == ["resolv.conf"]


def test_resolv_conf_unwritable_gives_one_line_advice(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ResolvConfError, match="--no-resolv-conf") as info:
        write_resolv_conf(str(blocker / "sub" / "resolv.conf"))
    assert "\n" not in str(info.value)


def test_the_users_resolv_conf_is_put_back_after_the_agent(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 10.0.0.2\nsearch corp.example\n")
    original = read_resolv_conf(str(path))
    write_resolv_conf(str(path))
    assert restore_resolv_conf(str(path), original) == f"restored {path}"
    assert path.read_text() == "nameserver 10.0.0.2\nsearch corp.example\n"


def test_a_resolv_conf_the_agent_created_is_removed_after_it(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    original = read_resolv_conf(str(path))
    assert original is None
    write_resolv_conf(str(path))
    assert restore_resolv_conf(str(path), original) == f"removed {path} (there was none before)"
    assert not path.exists()


def test_a_resolv_conf_changed_since_the_agent_wrote_it_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 10.0.0.2\n")
    original = read_resolv_conf(str(path))
    write_resolv_conf(str(path))
    path.write_text("nameserver 10.9.9.9\n")  # the user's own change meanwhile
    assert "does not hold what the agent wrote" in restore_resolv_conf(str(path), original)
    assert path.read_text() == "nameserver 10.9.9.9\n"


def test_restoring_follows_the_symlink_like_writing(tmp_path: Path) -> None:
    target = tmp_path / "run" / "resolv.conf"
    target.parent.mkdir()
    target.write_text("nameserver 10.0.0.2\n")
    link = tmp_path / "resolv.conf"
    link.symlink_to(target)
    original = read_resolv_conf(str(link))
    write_resolv_conf(str(link))
    restore_resolv_conf(str(link), original)
    assert link.is_symlink()
    assert target.read_text() == "nameserver 10.0.0.2\n"

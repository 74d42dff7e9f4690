"""`command_problem`: why `nitro-netd sim exec` cannot run a command, and the shell's exit
status for it (127: not found, 126: not executable)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nitro_netd.sim.foreground import command_problem


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The only directory on PATH, holding `runnable` (mode 755) and `plain` (mode 644)."""
    (tmp_path / "runnable").write_text("#!/bin/sh\n")
    (tmp_path / "runnable").chmod(0o755)
    (tmp_path / "plain").write_text("#!/bin/sh\n")
    (tmp_path / "plain").chmod(0o644)
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def test_a_runnable_command_has_no_problem(bin_dir: Path) -> None:
    assert command_problem("runnable") is None
    assert command_problem(str(bin_dir / "runnable")) is None


def test_a_missing_path_is_not_found(bin_dir: Path) -> None:
    missing = str(bin_dir / "missing")

    assert command_problem(missing) == (f"{missing}: command not found", 127)


def test_a_name_not_on_path_is_not_found(bin_dir: Path) -> None:
    assert command_problem("missing") == ("missing: command not found", 127)


def test_a_file_without_execute_permission_cannot_run(bin_dir: Path) -> None:
    plain = str(bin_dir / "plain")

    assert command_problem(plain) == (f"{plain}: permission denied", 126)
    assert command_problem("plain") == ("plain: permission denied", 126)


def test_a_directory_cannot_run(bin_dir: Path) -> None:
    assert command_problem(str(bin_dir)) == (f"{bin_dir}: is a directory", 126)

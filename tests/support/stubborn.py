"""A command that ignores SIGINT and starts a child that does too, for the tests of what
`nitro-netd sim exec` leaves behind after an interrupt."""

from __future__ import annotations

from pathlib import Path
from typing import Final

STARTS_A_STUBBORN_CHILD: Final = """
trap '' INT
sleep 60 &
echo $! > "$1.tmp" && mv "$1.tmp" "$1"
wait
"""
"""Ignores SIGINT, starts `sleep 60` (SIGINT ignored too) and writes its pid to $1."""


def stubborn_argv(pid_file: Path) -> list[str]:
    """The command, writing its child's pid to `pid_file`."""
    return ["sh", "-c", STARTS_A_STUBBORN_CHILD, "sh", str(pid_file)]

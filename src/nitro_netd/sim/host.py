"""What the simulator needs from the machine, and small helpers over `ip` and `/proc`.

The simulator is the one part of nitro-netd allowed to shell out to `ip` (STYLE.md item 31):
it runs as a test and demo harness, never inside the data path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from typing import Final

APT_PACKAGES: Final = {
    "ip": "iproute2",
    "ping": "iputils-ping",
    "passt": "passt",
    "curl": "curl",
    "iperf3": "iperf3",
    "tcpdump": "tcpdump",
    "dnsmasq": "dnsmasq-base",
    "socat": "socat",
    "dig": "bind9-dnsutils",
    "getent": "libc-bin",
    "setsid": "util-linux",
    "ss": "iproute2",
    "ssh": "openssh-client",
    "scp": "openssh-client",
    "ssh-keygen": "openssh-client",
    "/usr/sbin/sshd": "openssh-server",
}
"""Debian package that provides each tool the simulator or its users may run."""

BASE_TOOLS: Final = ("ip",)
"""Tools every simulator needs."""


class SimError(RuntimeError):
    """The simulator cannot do what was asked; the message says what to do about it."""


class HostUnfit(SimError):
    """This machine cannot run simulators at all (not root, a tool missing, no netns)."""


def host_problem(tools: Iterable[str] = BASE_TOOLS) -> str | None:
    """Return one line saying why simulators cannot run here, or None if they can.

    Args:
        tools: command names that must be on PATH besides the base tools.
    """
    if os.geteuid() != 0:
        return "needs root (network namespaces): run it with sudo"
    for tool in (*BASE_TOOLS, *tools):
        if shutil.which(tool) is None:
            return f"{tool} not found: apt-get install {APT_PACKAGES.get(tool, tool)}"
    return None


def require_host(tools: Iterable[str] = ()) -> None:
    """Raise `HostUnfit` with `host_problem`'s message if simulators cannot run here."""
    problem = host_problem(tools)
    if problem is not None:
        raise HostUnfit(problem)


def ip(*args: str) -> str:
    """Run `ip ARGS...` and return its output.

    Raises:
        SimError: `ip` failed (message has the command and its error).
    """
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise SimError(f"`ip {' '.join(args)}` failed: {detail}")
    return proc.stdout


def list_netns() -> list[str]:
    """Names of all network namespaces known to `ip netns`."""
    names = []
    for line in ip("netns", "list").splitlines():
        if line.strip():
            names.append(line.split()[0])
    return names


def netns_pids(netns: str) -> list[int]:
    """Pids of the processes living in a network namespace (empty if it is gone)."""
    proc = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    )
    return [int(word) for word in proc.stdout.split() if word.isdigit()]


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name, or None if the process is
    gone: ``[0]`` is field 3 (the state), ``[1]`` the parent's pid, ``[19]`` the start time.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
    _, paren, rest = text.rpartition(")")
    return rest.split() if paren else None


def process_start_time(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot, or None if it is gone.

    A pid plus its start time names one process for good: pids are reused, start times
    of the same pid are not.
    """
    fields = stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] == "Z":
        return None
    return int(fields[19])


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting for its reaper."""
    fields = stat_fields(pid)
    return fields is not None and len(fields) > 0 and fields[0] != "Z"


def is_alive(pid: int, start_time: int | None) -> bool:
    """True if the process `pid` that started at `start_time` still runs."""
    return start_time is not None and process_start_time(pid) == start_time

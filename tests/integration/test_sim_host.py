"""The simulator's reading of /proc: a process is found by its parent and named by its start
time, whatever its command name holds. Real processes, no root."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from nitro_netd.sim.host import is_alive, is_running, process_start_time, stat_fields

pytestmark = pytest.mark.timeout(60)

AWKWARD_NAME: Final = "a) b (c) Z"
"""A command name with spaces, parentheses and a lone state letter (15 bytes at most)."""
CHILD: Final = f"""
import sys, time
with open("/proc/self/comm", "w") as comm:
    comm.write({AWKWARD_NAME!r})
print("named", flush=True)
time.sleep(60)
"""


@pytest.fixture
def awkward_child() -> Iterator[subprocess.Popen[str]]:
    """A child that renamed itself `AWKWARD_NAME` (and said so)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "named\n"
        yield child
    finally:
        child.kill()
        child.communicate()  # reaps it and closes its pipe


def test_stat_fields_read_past_an_awkward_command_name(
    awkward_child: subprocess.Popen[str],
) -> None:
    assert Path(f"/proc/{awkward_child.pid}/comm").read_text() == AWKWARD_NAME + "\n"
    fields = stat_fields(awkward_child.pid)
    assert fields is not None
    assert fields[0] in "RS"  # running or sleeping, not the name's "Z"
    assert fields[1] == str(os.getpid())
    assert process_start_time(awkward_child.pid) == int(fields[19])
    assert is_running(awkward_child.pid)


def test_a_finished_process_has_no_fields_and_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start_time(child.pid)
    assert start is not None
    child.wait()  # reaped: its pid names nothing now, or a newer process
    assert stat_fields(child.pid) is None or process_start_time(child.pid) != start
    assert not is_alive(child.pid, start)


def test_a_zombie_is_not_running() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 20
        while (fields := stat_fields(child.pid)) is not None and fields[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)  # polling for its exit (it stays unreaped until the end)
        assert fields is not None
        assert fields[0] == "Z"
        assert not is_running(child.pid)
    finally:
        child.wait()

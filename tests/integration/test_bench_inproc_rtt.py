"""`bench/inproc_rtt.py` still drives the real daemon end to end (the figure is not judged
here: the benchmark is, never a test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "inproc_rtt.py"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_inproc_round_trips_complete_through_the_daemon(loop: str, tmp_path: Path) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop", reason="the fast extra is optional; CI installs it")
    profile = tmp_path / "rtt.prof"
    argv = [sys.executable, str(SCRIPT), "--rounds", "200", "--loop", loop]
    result = subprocess.run(
        [*argv, "--profile", str(profile)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(
        rf"(\d+\.\d\d) us per round trip \(in one process, {loop}\)\n", result.stdout
    )
    assert match, result.stdout
    assert float(match.group(1)) > 0
    assert profile.stat().st_size > 0, "no profile written"

"""The `nitro-netd` command: the demo and the `sim` subcommands."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from nitro_netd.cli.umbrella import main
from nitro_netd.sim import destroy, load_state
from nitro_netd.sim.host import list_netns

pytestmark = [pytest.mark.netns("ping"), pytest.mark.timeout(90)]


def test_demo_pings_gateway_and_cleans_up() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nitro_netd.cli.umbrella", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Result: OK" in result.stdout
    match = re.search(r"Built simulator (nnd-[0-9a-f]{6})", result.stdout)
    assert match, result.stdout
    assert not [ns for ns in list_netns() if ns.startswith(match[1])]
    assert load_state(match[1]) is None


def test_sim_up_exec_list_down(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "up"]) == 0
    match = re.search(r"simulator (nnd-[0-9a-f]{6}) is up", capsys.readouterr().out)
    assert match
    name = match[1]
    try:
        assert main(["sim", "exec", name, "world", "--", "sh", "-c", "exit 3"]) == 3
        assert main(["sim", "list"]) == 0
        assert re.search(rf"{name}\s+detached", capsys.readouterr().out)

        assert main(["sim", "down", name]) == 0
    finally:
        if load_state(name) is not None:
            destroy(name, force=True)

    assert not [ns for ns in list_netns() if ns.startswith(name)]
    assert main(["sim", "down", name]) == 1
    assert "no simulator named" in capsys.readouterr().err

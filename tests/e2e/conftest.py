"""End-to-end tier: real namespaces, a real TAP and kernel TCP/IP in the "enclave".

Every test gets a fresh `Simulator` through the `sim` fixture, removed afterwards whatever
happened. Tests here carry the `netns` marker; they are skipped with the reason when the
machine cannot run them (not root, `ip netns` unusable, a tool missing), except under CI
(`CI` set) or `NITRO_NETD_E2E=require`, where a missing prerequisite is a failure: CI runs
as root and must run them all.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from nitro_netd.sim import Simulator, cleanup_stale, host_problem

_PROBLEM = pytest.StashKey[str]()
"""Why a netns test cannot run here, when it must run anyway (CI)."""


def _must_run() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("NITRO_NETD_E2E") == "require"


def _netns_problem() -> str | None:
    problem = host_problem()
    if problem is not None:
        return problem
    probe = f"nnd-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip (or, under CI, fail) the netns tests this machine cannot run, with the reason."""
    netns_items = [item for item in items if item.get_closest_marker("netns")]
    if not netns_items:
        return
    base_problem = _netns_problem()
    for item in netns_items:
        # `@pytest.mark.netns("passt", "curl")`: the tools a test runs besides `ip`.
        tools = [tool for marker in item.iter_markers("netns") for tool in marker.args]
        problem = base_problem or host_problem(tools)
        if problem is None:
            continue
        if _must_run():
            item.stash[_PROBLEM] = problem
        else:
            item.add_marker(pytest.mark.skip(reason=problem))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under CI, fail a netns test whose prerequisite is missing, before its fixtures run."""
    problem = item.stash.get(_PROBLEM, None)
    if problem is not None:
        pytest.fail(f"end-to-end prerequisite missing under CI: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def _no_stale_simulators() -> None:
    """Remove leftovers of simulators whose owner died (a killed earlier run)."""
    cleanup_stale()


@pytest.fixture
def sim(_no_stale_simulators: None) -> Iterator[Simulator]:
    """A fresh simulator for one test; removed afterwards, on failure and Ctrl-C too."""
    with Simulator() as simulator:
        yield simulator

"""Our agent against a stock peer: Debian's passt as the parent engine (QEMU framing)."""

from __future__ import annotations

import hashlib
import os

import pytest

from nitro_netd.sim import WORLD_ADDRESS, Simulator

from .helpers import LINK_TIMEOUT, assert_exit, wait_for_log

pytestmark = [pytest.mark.netns("passt", "curl"), pytest.mark.timeout(90)]

HTTP_PORT = 8080
FILE_SIZE = 4 << 20


def test_agent_with_passt_fetches_http_file(sim: Simulator) -> None:
    www = sim.workdir / "www"
    www.mkdir()
    payload = os.urandom(FILE_SIZE)
    (www / "file").write_bytes(payload)
    server = sim.spawn(
        "http",
        "world",
        [sim.python, "-m", "http.server", str(HTTP_PORT), "--bind", WORLD_ADDRESS,
         "--directory", str(www)],
    )  # fmt: skip
    _, passt_url = sim.start_passt()
    agent = sim.start_agent(["--protocol", "qemu"], parent=passt_url)
    wait_for_log(sim, server, "Serving HTTP", LINK_TIMEOUT)
    wait_for_log(sim, agent, "link up", LINK_TIMEOUT)
    fetched = sim.workdir / "fetched"

    result = sim.run(
        "enclave",
        ["curl", "--silent", "--show-error", "--fail", "--max-time", "30",
         "--retry", "3", "--retry-connrefused", "--retry-delay", "1",
         "--output", str(fetched), f"http://{WORLD_ADDRESS}:{HTTP_PORT}/file"],
        timeout=60,
    )  # fmt: skip

    assert_exit(sim, result, 0, "curl through passt")
    got = fetched.read_bytes()
    assert len(got) == FILE_SIZE
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()

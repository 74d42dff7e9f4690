"""`nitro-netd demo`: show a newcomer the bridge working end to end in the simulator.

It builds a simulator, starts the daemon (exposing parent port 8080 as enclave port 80)
and the agent, then shows, step by step: a ping to the gateway; an HTTP download from a
server in the "world" with its sha256 checked; the parent alias resolved by the gateway's
DNS; and an HTTP request from the world into the enclave through the exposed port. It
always tears everything down.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Final

from nitro_netd.sim import (
    GATEWAY_ADDRESS,
    PARENT_ADDRESS,
    WORLD_ADDRESS,
    Role,
    SimError,
    Simulator,
    cleanup_stale,
    require_host,
)

PROG: Final = "nitro-netd"
LINK_TIMEOUT: Final = 15.0
DOWNLOAD_BYTES: Final = 32 << 20
WORLD_HTTP_PORT: Final = 8000
EXPOSE: Final = ("8080", "80")


class DemoFailed(Exception):
    """A step did not show what it should; the message says which."""


class _Steps:
    """Prints numbered steps with indented details."""

    def __init__(self) -> None:
        self.number = 0

    def __call__(self, headline: str, *details: str) -> None:
        self.number += 1
        print(f"\n{self.number}. {headline}")
        for line in details:
            print(f"     {line}")
        sys.stdout.flush()


def demo(mtu: int | None) -> int:
    """Walk a newcomer through the bridge; return the exit status."""
    require_host(["ping", "curl", "getent"])
    removed = cleanup_stale()
    if removed:
        print(f"(removed leftovers of dead simulators: {', '.join(removed)})")
    mtu_args = ["--mtu", str(mtu)] if mtu else []
    step = _Steps()
    with Simulator() as sim:
        try:
            _run_steps(sim, step, mtu_args)
        except (DemoFailed, SimError) as exc:
            print(f"\nResult: FAILED: {str(exc).splitlines()[0]}\nLogs of the processes:")
            print(sim.logs_tail())
            print("Tearing down.")
            return 1
        print(
            f"\n{step.number + 1}. Tearing down: stopping every process, removing the namespaces."
        )
    print("\nResult: OK. The enclave reached its gateway, the world and the parent, and the world")
    print("reached a server inside the enclave, all through the userspace bridge.")
    print(f"To keep one running and explore: {PROG} sim up --bridge")
    return 0


def _run_steps(sim: Simulator, step: _Steps, mtu_args: Sequence[str]) -> None:
    step(
        f"Built simulator {sim.name}: three network namespaces on this machine.",
        f"enclave  {sim.netns('enclave')}: only lo for now; plays the Nitro Enclave (no NIC)",
        f"parent   {sim.netns('parent')}: plays the EC2 instance, eth0 {PARENT_ADDRESS}",
        f"world    {sim.netns('world')}: plays the internet, {WORLD_ADDRESS}",
        f"The link is the unix socket {sim.link_path} in place of vsock.",
    )
    parent = sim.start_parent([*mtu_args, "--expose", ":".join(EXPOSE)])
    step(
        f"Started the parent daemon in the parent namespace (pid {parent.pid}).",
        f"It listens on {sim.link_url}, answers for the gateway {GATEWAY_ADDRESS},",
        f"and exposes parent port {EXPOSE[0]} as enclave port {EXPOSE[1]}.",
    )
    agent = sim.start_agent(mtu_args)
    agent.wait_for_log("link up", LINK_TIMEOUT)
    tap = sim.run(Role.ENCLAVE, ["ip", "-brief", "address", "show", "tap0"]).stdout.strip()
    step(
        f"Started the agent in the enclave namespace (pid {agent.pid}); the link is up.",
        "It created tap0 and moves its Ethernet frames over the link:",
        tap or "(tap0 not found)",
    )
    _ping(sim, step)
    _download(sim, step)
    _resolve(sim, step)
    _expose(sim, step)


def _run(sim: Simulator, role: Role, argv: list[str], what: str) -> str:
    result = sim.run(role, argv, timeout=60)
    if result.returncode != 0:
        raise DemoFailed(f"{what}: exit status {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def _ping(sim: Simulator, step: _Steps) -> None:
    argv = ["ping", "-c", "3", "-W", "2", GATEWAY_ADDRESS]
    out = _run(sim, Role.ENCLAVE, argv, "ping")
    step(f"Ran `{' '.join(argv)}` inside the enclave:", *out.strip().splitlines()[-2:])


def _serve_http(sim: Simulator, role: Role, address: str, port: int, directory: str) -> None:
    argv = [
        sys.executable,
        "-m",
        "http.server",
        str(port),
        "--bind",
        address,
        "--directory",
        directory,
    ]
    server = sim.spawn(f"http-{role.value}", role, argv)
    server.wait_for_log("Serving HTTP", LINK_TIMEOUT)


def _download(sim: Simulator, step: _Steps) -> None:
    root = sim.workdir / "www"
    root.mkdir()
    data = os.urandom(DOWNLOAD_BYTES)
    (root / "random.bin").write_bytes(data)
    _serve_http(sim, Role.WORLD, WORLD_ADDRESS, WORLD_HTTP_PORT, str(root))
    target = sim.workdir / "downloaded.bin"
    url = f"http://{WORLD_ADDRESS}:{WORLD_HTTP_PORT}/random.bin"
    start = time.monotonic()
    _run(sim, Role.ENCLAVE, ["curl", "-sS", "-o", str(target), url], "curl from the enclave")
    seconds = time.monotonic() - start
    same = hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
    if not same:
        raise DemoFailed("the downloaded file differs from the served one")
    step(
        f"Downloaded {url} with curl inside the enclave (outbound TCP):",
        f"{DOWNLOAD_BYTES >> 20} MiB in {seconds:.2f} s, sha256 identical to the served file.",
    )


def _resolve(sim: Simulator, step: _Steps) -> None:
    out = _run(sim, Role.ENCLAVE, ["getent", "hosts", "host.docker.internal"], "getent")
    resolv_lines = sim.run(Role.ENCLAVE, ["cat", "/etc/resolv.conf"]).stdout.splitlines()
    resolv = "; ".join(line for line in resolv_lines if line.startswith("nameserver"))
    step(
        "Resolved host.docker.internal inside the enclave (DNS at the gateway):",
        out.strip(),
        f"(the enclave's /etc/resolv.conf, written by the agent, says: {resolv})",
        "192.168.127.254:PORT inside the enclave is the parent's own 127.0.0.1:PORT.",
    )


def _expose(sim: Simulator, step: _Steps) -> None:
    root = sim.workdir / "enclave-www"
    root.mkdir()
    (root / "index.html").write_text("hello from inside the enclave\n")
    _serve_http(sim, Role.ENCLAVE, "0.0.0.0", int(EXPOSE[1]), str(root))
    url = f"http://{PARENT_ADDRESS}:{EXPOSE[0]}/index.html"
    out = _run(sim, Role.WORLD, ["curl", "-sS", url], "curl from the world")
    if "hello from inside the enclave" not in out:
        raise DemoFailed(f"unexpected answer from the enclave: {out!r}")
    step(
        f"Fetched {url} from the world (inbound, through --expose {':'.join(EXPOSE)}):",
        out.strip(),
    )

"""Build and remove a simulator's three namespaces.

```
 enclave (lo only)          parent                      world
  agent makes tap0    eth0 198.18.0.1/24  ══veth══  eth0 198.18.0.2/24
                      default via 198.18.0.2
```

Addresses come from the benchmarking range 198.18.0.0/15 (RFC 2544), so nothing in the
simulator can be mistaken for, or leak towards, a real outside address. Every namespace has
its own `/etc/netns/NAME/{resolv.conf,hosts}`, which `ip netns exec` bind-mounts over the
machine's files: the machine's `/etc/resolv.conf` is never written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from typing import Final

from nitro_netd.sim.host import SimError, ip, is_alive, is_running, netns_pids
from nitro_netd.sim.state import ETC_NETNS, NETNS_NAME, SIM_NAME, Role, SimState

PARENT_ADDRESS: Final = "198.18.0.1"
WORLD_ADDRESS: Final = "198.18.0.2"
PREFIX_LENGTH: Final = 24
GATEWAY_ADDRESS: Final = "192.168.127.1"
"""The netstack's gateway, as seen from the enclave."""
ENCLAVE_ADDRESS: Final = "192.168.127.2"
HOST_ALIAS_ADDRESS: Final = "192.168.127.254"
"""Inside the enclave, `.254:P` is the parent's `127.0.0.1:P`."""

SYSCTLS: Final = {
    # No duplicate address detection: addresses are usable at once, no tentative state.
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    # Unprivileged ICMP echo sockets for every group (a fresh namespace allows none).
    "net.ipv4.ping_group_range": "0 2147483647",
}
"""Set in every namespace before its interfaces exist (written to /proc/sys from inside
the namespace, so procps's `sysctl` is not needed)."""

HOSTS: Final = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
RESOLV_CONF: Final = {
    Role.ENCLAVE: "",  # the agent writes it
    Role.PARENT: f"nameserver {WORLD_ADDRESS}\n",
    Role.WORLD: f"nameserver {WORLD_ADDRESS}\n",
}
STOP_GRACE_SECONDS: Final = 3.0


def build(state: SimState) -> None:
    """Create the namespaces, their /etc files, the veth pair, addresses and routes.

    Raises:
        SimError: a step failed (the caller tears down what was built).
    """
    names = state.namespaces
    for role, netns in names.items():
        _write_etc(netns, role)
        ip("netns", "add", netns)
        _apply_sysctls(netns)
        ip("-n", netns, "link", "set", "lo", "up")
    parent, world = names[Role.PARENT], names[Role.WORLD]
    ip("-n", parent, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", world)
    for netns, address in ((parent, PARENT_ADDRESS), (world, WORLD_ADDRESS)):
        ip("-n", netns, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
    ip("-n", parent, "route", "add", "default", "via", WORLD_ADDRESS)


def _write_etc(netns: str, role: Role) -> None:
    etc = ETC_NETNS / netns
    etc.mkdir(mode=0o755, parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text(RESOLV_CONF[role], encoding="ascii")
    (etc / "hosts").write_text(HOSTS, encoding="ascii")


def _apply_sysctls(netns: str) -> None:
    script = "; ".join(
        f"echo '{value}' > /proc/sys/{key.replace('.', '/')}" for key, value in SYSCTLS.items()
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, "sh", "-ec", script],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SimError(f"cannot set sysctls in {netns}: {proc.stderr.strip()}")


def teardown(state: SimState) -> list[str]:
    """Stop the recorded processes and everything left in the namespaces, then remove the
    namespaces, their /etc/netns dirs, the daemon's state dir, the work dir and the state file.

    Best effort: every step runs even if an earlier one failed.

    Returns:
        One line per step that failed (empty when everything is gone).
    """
    problems: list[str] = []
    pids = [r.pid for r in state.processes if is_alive(r.pid, r.start_time)]
    for netns in state.namespaces.values():
        pids.extend(netns_pids(netns))
    stop_pids(pids)
    for netns in state.namespaces.values():
        problems.extend(remove_netns(netns))
    if SIM_NAME.fullmatch(state.name):
        shutil.rmtree(state.daemon_state_dir, ignore_errors=True)
    workdir = state.workdir
    if workdir and os.path.basename(workdir).startswith(state.name):
        shutil.rmtree(workdir, ignore_errors=True)
        if os.path.exists(workdir):
            problems.append(f"cannot remove work dir {workdir}")
    if not problems:
        state.remove()
    return problems


def remove_netns(netns: str) -> list[str]:
    """Kill what lives in one of our namespaces, delete it and its /etc/netns dir."""
    if not NETNS_NAME.fullmatch(netns):
        return [f"refusing to remove {netns!r}: not a simulator namespace"]
    problems = []
    stop_pids(netns_pids(netns))
    if os.path.exists(f"/run/netns/{netns}"):
        try:
            ip("netns", "del", netns)
        except SimError as exc:
            problems.append(str(exc))
    shutil.rmtree(ETC_NETNS / netns, ignore_errors=True)
    return problems


def stop_pids(pids: list[int], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM each process (and its process group if it leads one), SIGKILL after `grace`.

    Only pass pids that are ours: recorded at start or living in our namespaces.
    """
    targets = sorted(set(pids) - {os.getpid()})
    if not targets:
        return
    for pid in targets:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_running(pid) for pid in targets):
        time.sleep(0.02)
    for pid in targets:
        if is_running(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)

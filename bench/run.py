"""Benchmark nitro-netd against passt, the kernel path and optional peers in the simulator.

    sudo python bench/run.py [--quick] [--runs N] [--peers nitro-netd,passt,kernel]
                             [--udp-rate 500M] [--idle-conns 10000]
                             [--mtu 65520,1500] [--workloads tcp,latency,crr,udp,idle]

Every peer runs the same workloads in the same invocation, interleaved per run (run 1 of
every peer, then run 2 of every peer, ...; the peer order rotates each run), each in a
fresh simulator that is removed afterwards, also on errors and Ctrl-C. Figures are the
median of the runs with their spread (min-max). Results: `bench/results/RESULTS.md` (the
table, also printed), raw JSON in `bench/results/raw/`, PNG bar plots when matplotlib is
installed (`pip install -e '.[bench]'`). See bench/README.md.

All traffic stays inside the simulator's namespaces (198.18.0.0/24 between parent and
world, 192.168.127.0/24 inside the enclave) and loopback. Never AF_VSOCK.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

from nitro_netd.link import DEFAULT_MTU
from nitro_netd.sim import (
    ENCLAVE_ADDRESS,
    GATEWAY_ADDRESS,
    PARENT_ADDRESS,
    WORLD_ADDRESS,
    ManagedProcess,
    SimError,
    Simulator,
    host_problem,
)
from nitro_netd.sim.host import ip

BENCH_DIR: Final = Path(__file__).resolve().parent
NETTOOL: Final = str(BENCH_DIR / "nettool.py")
ECHO_PORT: Final = 7001
IDLE_PORT: Final = 7002
IPERF_BASE_PORT: Final = 5201
READY_TIMEOUT: Final = 20.0
DEFAULT_MTUS: Final = (65520, 1500)
GVPROXY_MTU: Final = 65000
"""gvproxy's 16-bit frame lengths cap its MTU below 65521."""
ENV_GVPROXY: Final = "NITRO_NETD_BENCH_GVPROXY"
ENV_GVFORWARDER: Final = "NITRO_NETD_BENCH_GVFORWARDER"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
ALL_WORKLOADS: Final = ("tcp", "latency", "crr", "udp", "idle")
"""In the order they run; `idle` last, so that its thousands of closing flows (TIME_WAIT,
the engine's flow table) cannot touch the other figures."""
DEFAULT_UDP_RATE: Final = "500M"
"""The issue's target: < 1 % loss at 500 Mbit/s."""
IDLE_COUNT: Final = 10_000
IDLE_CONCURRENCY: Final = 256
"""Connects in flight at once while opening the idle flows (nitro-netd allows 1024 pending)."""
IDLE_OPEN_TIMEOUT: Final = 120.0
IDLE_CHECK_TIMEOUT: Final = 60.0
RSS_TARGET_MB: Final = 200.0
UDP_LOSS_TARGET_PCT: Final = 1.0


# -- metrics ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    group: str
    """Which plot it goes into."""


METRICS: Final = (
    Metric("tcp_up_1", "TCP enclave→world, 1 stream", "Gbit/s", True, "throughput"),
    Metric("tcp_down_1", "TCP world→enclave (-R), 1 stream", "Gbit/s", True, "throughput"),
    Metric("tcp_up_8", "TCP enclave→world, 8 streams", "Gbit/s", True, "throughput"),
    Metric("tcp_down_8", "TCP world→enclave (-R), 8 streams", "Gbit/s", True, "throughput"),
    Metric("tcp_up_1_late", "TCP enclave→world, 1 stream, after 1 s", "Gbit/s", True, "late"),
    Metric("tcp_down_1_late", "TCP world→enclave, 1 stream, after 1 s", "Gbit/s", True, "late"),
    Metric("tcp_up_8_late", "TCP enclave→world, 8 streams, after 1 s", "Gbit/s", True, "late"),
    Metric("tcp_down_8_late", "TCP world→enclave, 8 streams, after 1 s", "Gbit/s", True, "late"),
    Metric("rr_p50_us", "TCP 1-byte round trip p50", "µs", False, "latency"),
    Metric("rr_p99_us", "TCP 1-byte round trip p99", "µs", False, "latency"),
    Metric("crr_per_s", "TCP connect+round trip+close", "conn/s", True, "connections"),
    Metric("udp_loss_pct", "UDP enclave→world at fixed rate: loss", "%", False, "udp"),
    Metric("udp_gbps", "UDP enclave→world at fixed rate: received", "Gbit/s", True, "udp"),
    Metric("idle_open_s", "idle TCP flows: time to open all", "s", False, "idle"),
    Metric("idle_conns_per_s", "idle TCP flows: opening rate", "conn/s", True, "idle"),
    Metric("idle_rss_before_mb", "parent engine RSS before the idle flows", "MB", False, "idle"),
    Metric("idle_rss_open_mb", "parent engine RSS, all idle flows open", "MB", False, "idle"),
    Metric("idle_kb_per_flow", "parent engine RSS added per idle flow", "KB", False, "idle"),
    Metric("idle_usable", "idle flows usable at the end (1-byte echo)", "flows", True, "idle"),
    Metric("cpu_daemon_up", "parent engine CPU per GB, enclave→world", "CPU s/GB", False, "cpu"),
    Metric("cpu_agent_up", "enclave agent CPU per GB, enclave→world", "CPU s/GB", False, "cpu"),
    Metric("cpu_daemon_down", "parent engine CPU per GB, world→enclave", "CPU s/GB", False, "cpu"),
    Metric("cpu_agent_down", "enclave agent CPU per GB, world→enclave", "CPU s/GB", False, "cpu"),
)


class WorkloadError(RuntimeError):
    """A workload could not produce its figure; the message goes into the results."""


# -- settings -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    runs: int
    seconds: int
    rr_rounds: int
    crr_count: int
    udp_rate: str
    udp_length: int
    idle_count: int
    workloads: tuple[str, ...]


# -- peers --------------------------------------------------------------------------------


@dataclass(slots=True)
class Session:
    """What a peer left running in one simulator: the processes whose CPU is counted."""

    daemon: ManagedProcess | None = None
    agent: ManagedProcess | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    description: str
    start: Callable[[Simulator], Session]


def start_nitro_netd(mtu: int) -> Callable[[Simulator], Session]:
    def start(sim: Simulator) -> Session:
        daemon = sim.start_parent(["--mtu", str(mtu)])
        agent = sim.start_agent(["--mtu", str(mtu)])
        agent.wait_for_log("link up", READY_TIMEOUT)
        return Session(daemon=daemon, agent=agent)

    return start


def start_passt(sim: Simulator) -> Session:
    daemon, url = sim.start_passt()
    agent = sim.start_agent(["--protocol", "qemu"], parent=url)
    agent.wait_for_log("link up", READY_TIMEOUT)
    return Session(daemon=daemon, agent=agent)


def start_kernel(sim: Simulator) -> Session:
    """The enclave namespace routed by the kernel: a veth to the parent, which forwards and
    masquerades towards the world (nft), or only routes if nft is missing."""
    enclave, parent = sim.netns("enclave"), sim.netns("parent")
    ip(
        "-n",
        enclave,
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "enc0",
        "netns",
        parent,
    )
    ip("-n", enclave, "addr", "add", f"{ENCLAVE_ADDRESS}/24", "dev", "eth0")
    ip("-n", enclave, "link", "set", "eth0", "up")
    ip("-n", enclave, "route", "add", "default", "via", GATEWAY_ADDRESS)
    ip("-n", parent, "addr", "add", f"{GATEWAY_ADDRESS}/24", "dev", "enc0")
    ip("-n", parent, "link", "set", "enc0", "up")
    checked(sim.run("parent", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]), "ip_forward")
    session = Session()
    if shutil.which("nft"):
        ruleset = (
            "table ip nndbench {\n"
            "  chain post { type nat hook postrouting priority srcnat; policy accept;\n"
            '    ip saddr 192.168.127.0/24 oifname "eth0" masquerade\n'
            "  }\n"
            "}\n"
        )
        checked(sim.run("parent", ["nft", "-f", "-"], input=ruleset), "nft masquerade")
    else:
        ip("-n", sim.netns("world"), "route", "add", "192.168.127.0/24", "via", PARENT_ADDRESS)
        session.notes.append("nft not installed: kernel peer routes without NAT")
    return session


def start_gvproxy(binary: str) -> Callable[[Simulator], Session]:
    def start(sim: Simulator) -> Session:
        sock = sim.workdir / "gvproxy.sock"
        daemon = sim.spawn(
            "gvproxy", "parent", [binary, "-listen", f"unix://{sock}", "-mtu", str(GVPROXY_MTU)]
        )
        wait_until(lambda: sock.exists(), READY_TIMEOUT, "gvproxy socket", daemon)
        agent = sim.start_agent(["--mtu", str(GVPROXY_MTU)], parent=f"unix://{sock}")
        agent.wait_for_log("link up", READY_TIMEOUT)
        return Session(daemon=daemon, agent=agent)

    return start


def start_gvforwarder(gvproxy: str, gvforwarder: str) -> Callable[[Simulator], Session]:
    """gvproxy in the parent and a stock gvforwarder in the enclave (untested here: no
    binaries on the development machines). The address is set by hand after tap0 appears."""

    def start(sim: Simulator) -> Session:
        sock = sim.workdir / "gvproxy.sock"
        daemon = sim.spawn(
            "gvproxy", "parent", [gvproxy, "-listen", f"unix://{sock}", "-mtu", str(GVPROXY_MTU)]
        )
        wait_until(lambda: sock.exists(), READY_TIMEOUT, "gvproxy socket", daemon)
        agent = sim.spawn(
            "gvforwarder",
            "enclave",
            [gvforwarder, "-url", f"unix://{sock}/connect", "-iface", "tap0",
             "-mtu", str(GVPROXY_MTU)],
        )  # fmt: skip
        enclave = sim.netns("enclave")

        def tap_exists() -> bool:
            return sim.run("enclave", ["ip", "link", "show", "tap0"]).returncode == 0

        wait_until(tap_exists, READY_TIMEOUT, "gvforwarder's tap0", agent)
        ip("-n", enclave, "addr", "replace", f"{ENCLAVE_ADDRESS}/24", "dev", "tap0")
        ip("-n", enclave, "link", "set", "tap0", "up")
        ip("-n", enclave, "route", "replace", "default", "via", GATEWAY_ADDRESS)
        return Session(daemon=daemon, agent=agent)

    return start


def build_peers(names: Sequence[str], mtus: Sequence[int]) -> tuple[list[Peer], list[str]]:
    """The peers to run, and one note per requested peer that is skipped."""
    peers: list[Peer] = []
    skipped: list[str] = []
    gvproxy = os.environ.get(ENV_GVPROXY)
    gvforwarder = os.environ.get(ENV_GVFORWARDER)
    for name in names:
        if name == "nitro-netd":
            for mtu in mtus:
                peers.append(
                    Peer(
                        f"nitro-netd/{mtu}",
                        f"our agent + our daemon, MTU {mtu} on both",
                        start_nitro_netd(mtu),
                    )
                )
        elif name == "passt":
            if shutil.which("passt") is None:
                skipped.append("passt: not installed (apt-get install passt)")
                continue
            peers.append(
                Peer(
                    "passt",
                    "Debian's passt as parent engine, our agent with --protocol qemu, MTU 65520",
                    start_passt,
                )
            )
        elif name == "kernel":
            peers.append(
                Peer(
                    "kernel",
                    "veth enclave⇄parent (MTU 1500, GSO/GRO), kernel forwarding + nft masquerade",
                    start_kernel,
                )
            )
        elif name == "gvproxy":
            if not gvproxy or not os.access(gvproxy, os.X_OK):
                skipped.append(f"gvproxy: set {ENV_GVPROXY}=/path/to/gvproxy to include it")
                continue
            peers.append(
                Peer(
                    "gvproxy",
                    f"gvproxy as parent engine, our agent (gvproxy protocol), MTU {GVPROXY_MTU}",
                    start_gvproxy(gvproxy),
                )
            )
        elif name == "gvforwarder":
            if not (gvproxy and gvforwarder and os.access(gvforwarder, os.X_OK)):
                skipped.append(
                    f"gvproxy+gvforwarder: set {ENV_GVPROXY} and {ENV_GVFORWARDER} to include it"
                )
                continue
            peers.append(
                Peer(
                    "gvproxy+gvforwarder",
                    f"stock gvproxy and gvforwarder, MTU {GVPROXY_MTU}",
                    start_gvforwarder(gvproxy, gvforwarder),
                )
            )
        else:
            raise SystemExit(f"unknown peer {name!r}")
    return peers, skipped


# -- helpers ------------------------------------------------------------------------------


def checked(
    result: subprocess.CompletedProcess[str], what: str
) -> subprocess.CompletedProcess[str]:
    if result.returncode != 0:
        raise SimError(f"{what} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, process: ManagedProcess
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if not process.is_alive():
            raise SimError(f"{process.name} exited before {what}\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise SimError(f"no {what} within {timeout:g} s\n{process.log_tail()}")
        time.sleep(0.05)


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU seconds of a process and all its descendants (reaped children count
    through their parent's cutime/cstime)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        ticks[pid] = sum(int(value) for value in fields[11:15])
    total = 0
    stack = [root]
    seen: set[int] = set()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += ticks.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / CLK_TCK


def tree_rss_mb(root: int) -> float | None:
    """Sum of VmRSS of a process and its descendants in MB (10^6 bytes; shared pages are
    counted once per process), or None if the root is gone."""
    total_kb = 0
    found = False
    for pid in (root, *descendants(root)):
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
                        found = True
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total_kb * 1024 / 1e6 if found else None


class LineReader:
    """Lines from a child's stdout pipe, each waited for with a timeout."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def readline(self, timeout: float) -> str | None:
        """The next line, or None on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode("utf-8", errors="replace")


def diagnose(session: Session) -> dict[str, Any]:
    """After a failure: state, kernel wait channel and CPU use over 1 s of every process in
    the daemon's and the agent's trees (is it spinning, blocked, or gone?)."""
    roots = {"daemon": session.daemon, "agent": session.agent}
    before = {name: tree_cpu_seconds(p.pid) for name, p in roots.items() if p is not None}
    time.sleep(1.0)
    out: dict[str, Any] = {}
    for name, process in roots.items():
        if process is None:
            continue
        pids = [process.pid, *descendants(process.pid)]
        states = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
                    state = stat.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/{pid}/wchan", encoding="ascii", errors="replace") as wchan:
                    channel = wchan.read().strip()
            except OSError:
                continue
            states.append(f"{pid}:{state}:{channel or '-'}")
        out[name] = {
            "cpu_percent_over_1s": round((tree_cpu_seconds(process.pid) - before[name]) * 100),
            "processes": states,
        }
    return out


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def nettool_json(sim: Simulator, args: Sequence[object], timeout: float) -> dict[str, Any]:
    argv = [sim.python, NETTOOL, *map(str, args)]
    try:
        result = sim.run("enclave", argv, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise WorkloadError(f"nettool {args[0]} timed out after {timeout:g} s") from exc
    lines = result.stdout.strip().splitlines()
    if not lines:
        raise WorkloadError(f"nettool {args[0]} printed nothing: {result.stderr.strip()[-300:]}")
    outcome: dict[str, Any] = json.loads(lines[-1])
    if result.returncode != 0 or not outcome.get("ok"):
        raise WorkloadError(f"nettool {args[0]}: {outcome.get('error', outcome)}")
    return outcome


class Context:
    """One peer in one simulator for one run: starts servers and runs clients."""

    def __init__(self, sim: Simulator, session: Session, settings: Settings) -> None:
        self.sim = sim
        self.session = session
        self.settings = settings
        self._port = IPERF_BASE_PORT
        self.details: dict[str, Any] = {}
        """Per-workload extras for the raw JSON (e.g. iperf3's per-second rates)."""

    @contextlib.contextmanager
    def iperf_server(self) -> Iterator[int]:
        """A one-off iperf3 server in the world on a fresh port, stopped afterwards."""
        self._port += 1
        port = self._port
        server = self.sim.spawn(
            "iperf3-server",
            "world",
            ["iperf3", "-s", "-1", "--forceflush", "-B", WORLD_ADDRESS, "-p", str(port)],
        )
        try:
            server.wait_for_log("Server listening", READY_TIMEOUT)
            yield port
        finally:
            server.stop(timeout=2.0)

    def iperf(self, extra: Sequence[str]) -> dict[str, Any]:
        """Run an iperf3 client in the enclave against a fresh server; its JSON report."""
        seconds = self.settings.seconds
        with self.iperf_server() as port:
            argv = ["iperf3", "-c", WORLD_ADDRESS, "-p", str(port), "-t", str(seconds), "-J",
                    "--connect-timeout", "5000", *extra]  # fmt: skip
            try:
                result = self.sim.run("enclave", argv, timeout=seconds + 30)
            except subprocess.TimeoutExpired as exc:
                raise WorkloadError(f"iperf3 {' '.join(extra)} timed out") from exc
        try:
            report: dict[str, Any] = json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise WorkloadError(
                f"iperf3 {' '.join(extra)}: no JSON (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-300:]}"
            ) from exc
        if "error" in report:
            raise WorkloadError(f"iperf3 {' '.join(extra)}: {report['error']}")
        return report

    def cpu(self) -> tuple[float | None, float | None]:
        def of(process: ManagedProcess | None) -> float | None:
            return None if process is None else tree_cpu_seconds(process.pid)

        return of(self.session.daemon), of(self.session.agent)


# -- workloads ----------------------------------------------------------------------------


LATE_AFTER_S: Final = 1.0
"""The `_late` figures leave out the first second: how a peer ramps up with eight new flows
(its first second) is kept apart from the rate it then holds. They come from the client's
intervals, which count what the enclave received world→enclave (-R) but what it sent
enclave→world (the whole-run figures are the receiver's in both directions)."""


def rate_after(intervals: list[dict[str, Any]], skip_s: float) -> float | None:
    """Gbit/s over iperf3's intervals that start `skip_s` seconds in or later; None if none."""
    late = [i["sum"] for i in intervals if i["sum"]["start"] >= skip_s - 1e-3]
    seconds = sum(i["seconds"] for i in late)
    if not late or seconds <= 0:
        return None
    return sum(i["bytes"] for i in late) * 8 / seconds / 1e9


def workload_tcp(ctx: Context, metrics: dict[str, float], errors: dict[str, str]) -> None:
    for streams in (1, 8):
        for direction, extra in (("up", []), ("down", ["-R"])):
            key = f"tcp_{direction}_{streams}"
            args = [*extra, "-P", str(streams)] if streams > 1 else extra
            try:
                daemon0, agent0 = ctx.cpu()
                report = ctx.iperf(args)
                daemon1, agent1 = ctx.cpu()
            except (WorkloadError, SimError) as exc:
                errors[key] = str(exc).splitlines()[0]
                continue
            ctx.details[key] = {
                "interval_gbps": [
                    round(interval["sum"]["bits_per_second"] / 1e9, 3)
                    for interval in report.get("intervals", [])
                ],
                "sender_retransmits": report["end"].get("sum_sent", {}).get("retransmits"),
            }
            received = report["end"]["sum_received"]
            metrics[key] = received["bits_per_second"] / 1e9
            late = rate_after(report.get("intervals", []), LATE_AFTER_S)
            if late is not None:
                metrics[f"{key}_late"] = late
            gigabytes = received["bytes"] / 1e9
            if streams == 1 and gigabytes > 0:
                if daemon0 is not None and daemon1 is not None:
                    metrics[f"cpu_daemon_{direction}"] = (daemon1 - daemon0) / gigabytes
                if agent0 is not None and agent1 is not None:
                    metrics[f"cpu_agent_{direction}"] = (agent1 - agent0) / gigabytes


def workload_latency(ctx: Context, metrics: dict[str, float], errors: dict[str, str]) -> None:
    rounds = ctx.settings.rr_rounds
    try:
        outcome = nettool_json(
            ctx.sim, ["latency", WORLD_ADDRESS, ECHO_PORT, rounds, rounds // 10], timeout=120
        )
    except WorkloadError as exc:
        errors["latency"] = str(exc)
        return
    metrics["rr_p50_us"] = outcome["p50_us"]
    metrics["rr_p99_us"] = outcome["p99_us"]


def workload_crr(ctx: Context, metrics: dict[str, float], errors: dict[str, str]) -> None:
    try:
        outcome = nettool_json(
            ctx.sim, ["crr", WORLD_ADDRESS, ECHO_PORT, ctx.settings.crr_count], timeout=180
        )
    except WorkloadError as exc:
        errors["crr"] = str(exc)
        return
    metrics["crr_per_s"] = outcome["conns_per_s"]


def workload_udp(ctx: Context, metrics: dict[str, float], errors: dict[str, str]) -> None:
    extra = ["-u", "-b", ctx.settings.udp_rate, "-l", str(ctx.settings.udp_length)]
    try:
        report = ctx.iperf(extra)
    except (WorkloadError, SimError) as exc:
        errors["udp"] = str(exc).splitlines()[0]
        return
    end = report["end"]
    summary = end.get("sum", {})
    if "lost_percent" not in summary:
        errors["udp"] = "iperf3 reported no loss figure"
        return
    metrics["udp_loss_pct"] = float(summary["lost_percent"])
    received = end.get("sum_received")
    if received is not None:
        metrics["udp_gbps"] = received["bits_per_second"] / 1e9
    else:
        metrics["udp_gbps"] = summary["bits_per_second"] * (1 - summary["lost_percent"] / 100) / 1e9


def workload_idle(ctx: Context, metrics: dict[str, float], errors: dict[str, str]) -> None:
    """Many concurrent idle TCP flows enclave→world: time to open them, the parent
    engine's memory with all of them open, and whether every one still works at the end."""
    sim, count = ctx.sim, ctx.settings.idle_count
    daemon = ctx.session.daemon
    details: dict[str, Any] = {"requested": count}
    ctx.details["idle"] = details
    server = sim.spawn(
        "idle-server", "world", [sim.python, NETTOOL, "idle-server", WORLD_ADDRESS, str(IDLE_PORT)]
    )
    client: subprocess.Popen[bytes] | None = None
    try:
        server.wait_for_log('"listening"', READY_TIMEOUT)
        rss_before = None if daemon is None else tree_rss_mb(daemon.pid)
        argv = [sim.python, NETTOOL, "idle", WORLD_ADDRESS, str(IDLE_PORT), str(count),
                str(IDLE_CONCURRENCY), f"{IDLE_OPEN_TIMEOUT:g}", f"{IDLE_CHECK_TIMEOUT:g}"]  # fmt: skip
        with (sim.workdir / "logs" / "idle-client.stderr").open("wb") as stderr:
            client = sim.popen(
                "enclave", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
            )
        assert client.stdout is not None
        assert client.stdin is not None
        lines = LineReader(client.stdout.fileno())
        line = lines.readline(IDLE_OPEN_TIMEOUT + 30)
        if line is None:
            raise WorkloadError(
                f"idle client: no report of the open phase within {IDLE_OPEN_TIMEOUT + 30:g} s "
                f"(exit {client.poll()})"
            )
        opened: dict[str, Any] = json.loads(line)
        if "phase" not in opened:  # it failed before opening anything
            raise WorkloadError(f"idle client: {opened.get('error', opened)}")
        details["open"] = opened
        # Every connection is open and idle now: measure, then let the client check them.
        time.sleep(1.0)
        rss_open = None if daemon is None else tree_rss_mb(daemon.pid)
        with contextlib.suppress(BrokenPipeError):
            client.stdin.write(b"go\n")
            client.stdin.flush()
        line = lines.readline(IDLE_CHECK_TIMEOUT + 30)
        if line is None:
            raise WorkloadError(
                f"idle client: no final report within {IDLE_CHECK_TIMEOUT + 30:g} s after "
                f"{opened['opened']} of {count} connections opened (exit {client.poll()})"
            )
        outcome: dict[str, Any] = json.loads(line)
        details["final"] = outcome
        client.wait(10)
        time.sleep(2.0)
        if daemon is not None:
            details["rss_after_close_mb"] = tree_rss_mb(daemon.pid)
    except (WorkloadError, SimError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        errors["idle"] = str(exc).splitlines()[0]
        return
    finally:
        if client is not None and client.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(client.pid, signal.SIGKILL)
            client.wait()
        server.stop(timeout=3.0)
    metrics["idle_usable"] = float(outcome.get("usable", 0))
    if opened["opened"] == count:
        metrics["idle_open_s"] = opened["seconds"]
        metrics["idle_conns_per_s"] = count / opened["seconds"]
        if rss_before is not None and rss_open is not None:
            metrics["idle_rss_before_mb"] = rss_before
            metrics["idle_rss_open_mb"] = rss_open
            metrics["idle_kb_per_flow"] = (rss_open - rss_before) * 1000 / count
    details["rss_before_mb"], details["rss_open_mb"] = rss_before, rss_open
    if not outcome.get("ok"):
        errors["idle"] = f"idle client: {outcome.get('error', outcome)}"


WORKLOADS: Final[dict[str, Callable[[Context, dict[str, float], dict[str, str]], None]]] = {
    "tcp": workload_tcp,
    "latency": workload_latency,
    "crr": workload_crr,
    "udp": workload_udp,
    "idle": workload_idle,
}


def run_peer_once(peer: Peer, settings: Settings, run: int) -> dict[str, Any]:
    """One fresh simulator, one peer, every selected workload once."""
    record: dict[str, Any] = {
        "run": run,
        "peer": peer.name,
        "load1_before": round(os.getloadavg()[0], 2),
        "source": source_version(),
        "metrics": {},
        "errors": {},
    }
    metrics: dict[str, float] = record["metrics"]
    errors: dict[str, str] = record["errors"]
    started = time.monotonic()
    with Simulator() as sim:
        try:
            session = peer.start(sim)
            sim.spawn("echo-server", "world", [sim.python, NETTOOL, "server", WORLD_ADDRESS,
                                               str(ECHO_PORT)]).wait_for_log(
                '"listening"', READY_TIMEOUT
            )  # fmt: skip
            nettool_json(sim, ["probe", WORLD_ADDRESS, ECHO_PORT, READY_TIMEOUT], timeout=60)
        except (SimError, WorkloadError, OSError) as exc:
            errors["setup"] = str(exc)
            record["log_tail"] = sim.logs_tail(15)
            return record
        record["notes"] = session.notes
        ctx = Context(sim, session, settings)
        record["details"] = ctx.details
        for name in settings.workloads:
            WORKLOADS[name](ctx, metrics, errors)
        for process in (session.daemon, session.agent):
            if process is not None and not process.is_alive():
                errors[f"{process.name}-exit"] = f"exited {process.returncode} during the run"
        if errors:
            record["log_tail"] = sim.logs_tail(15)
            record["diagnostics"] = diagnose(session)
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


# -- summary ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figure:
    median: float
    low: float
    high: float
    n: int


def summarise(records: list[dict[str, Any]], peers: list[str]) -> dict[str, dict[str, Figure]]:
    """peer -> metric key -> median and spread over the runs."""
    out: dict[str, dict[str, Figure]] = {}
    for peer in peers:
        values: dict[str, list[float]] = {}
        for record in records:
            if record["peer"] == peer:
                for key, value in record["metrics"].items():
                    values.setdefault(key, []).append(value)
        out[peer] = {
            key: Figure(statistics.median(vals), min(vals), max(vals), len(vals))
            for key, vals in values.items()
        }
    return out


def fmt(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(figure: Figure | None, reference: Figure | None, runs: int) -> str:
    if figure is None:
        return "n/a"
    text = fmt(figure.median)
    if figure.n > 1:
        text += f" ({fmt(figure.low)}-{fmt(figure.high)})"
    if figure.n < runs:
        text += f" [{figure.n}/{runs} runs]"
    if reference is not None and reference.median > 0:
        text += f" · {figure.median / reference.median:.2f}x"
    elif reference is not None and figure.median == 0 and reference.median == 0:
        text += " · ="
    return text


def table(summary: dict[str, dict[str, Figure]], peers: list[str], settings: Settings) -> str:
    reference = "passt" if "passt" in peers else None
    lines = [
        "| workload | unit | better | " + " | ".join(peers) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in peers) + " |",
    ]
    for metric in METRICS:
        if not any(metric.key in summary[p] for p in peers):
            continue
        cells = []
        for peer in peers:
            ref = summary[reference].get(metric.key) if reference else None
            cells.append(cell(summary[peer].get(metric.key), ref, settings.runs))
        better = "higher" if metric.higher_is_better else "lower"
        lines.append(f"| {metric.label} | {metric.unit} | {better} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(
    summary: dict[str, dict[str, Figure]], peers: list[str], settings: Settings
) -> list[str]:
    """One line per performance target of the issue: met / not met / not measured, with the
    medians it was judged on. Targets about nitro-netd in general must hold for every
    nitro-netd MTU in the run."""
    ours = [p for p in peers if p.startswith("nitro-netd/")]
    default = f"nitro-netd/{DEFAULT_MTU}"

    def get(peer: str, key: str) -> Figure | None:
        return summary.get(peer, {}).get(key)

    def line(goal: str, verdicts: list[tuple[bool | None, str]]) -> str:
        """`None` in a verdict: not measured (a figure missing, or not at the target's size)."""
        if not verdicts or any(ok is None for ok, _ in verdicts):
            status = "not measured"
        else:
            status = "met" if all(ok for ok, _ in verdicts) else "not met"
        return f"- **{status}**: {goal}: " + ("; ".join(text for _, text in verdicts) or "no peer")

    out: list[str] = []
    # 1. bulk TCP at the default MTU against passt.
    verdicts: list[tuple[bool | None, str]] = []
    for key, what in (("tcp_up_1", "enclave→world"), ("tcp_down_1", "world→enclave")):
        mine, theirs = get(default, key), get("passt", key)
        if mine is None or theirs is None or theirs.median <= 0:
            verdicts.append((None, f"{what} n/a"))
            continue
        ratio = mine.median / theirs.median
        text = f"{what} {fmt(mine.median)} vs passt {fmt(theirs.median)} Gbit/s = {ratio:.2f}x"
        verdicts.append((ratio >= 1.0, text))
    goal = f"bulk TCP (1 stream) each direction ≥ 1.0x passt at the default MTU {DEFAULT_MTU}"
    out.append(line(goal, verdicts))
    # 2. absolute rate at MTU 1500.
    verdicts = []
    for key, what in (("tcp_up_1", "enclave→world"), ("tcp_down_1", "world→enclave")):
        figure = get("nitro-netd/1500", key)
        if figure is None:
            verdicts.append((None, f"{what} n/a"))
        else:
            verdicts.append((figure.median >= 1.5, f"{what} {fmt(figure.median)} Gbit/s"))
    out.append(line("≥ 1.5 Gbit/s each direction (1 stream) at MTU 1500", verdicts))
    # 3. 8 streams in sum no slower than 1.
    verdicts = []
    for peer in ours:
        for direction, what in (("up", "enclave→world"), ("down", "world→enclave")):
            one, eight = get(peer, f"tcp_{direction}_1"), get(peer, f"tcp_{direction}_8")
            if one is None or eight is None:
                verdicts.append((None, f"{peer} {what} n/a"))
            else:
                text = (
                    f"{peer} {what} 8 streams {fmt(eight.median)} vs 1 stream "
                    f"{fmt(one.median)} Gbit/s"
                )
                late_one = get(peer, f"tcp_{direction}_1_late")
                late_eight = get(peer, f"tcp_{direction}_8_late")
                if late_one is not None and late_eight is not None:
                    text += (
                        f" (after the first second {fmt(late_eight.median)} vs "
                        f"{fmt(late_one.median)})"
                    )
                verdicts.append((eight.median >= one.median, text))
    out.append(line("8 parallel streams no slower in sum than one", verdicts))
    # 4. latency added over the kernel path, against passt's.
    verdicts = []
    kernel, passt = get("kernel", "rr_p50_us"), get("passt", "rr_p50_us")
    for peer in ours:
        mine = get(peer, "rr_p50_us")
        if mine is None or kernel is None or passt is None:
            verdicts.append((None, f"{peer} n/a (needs the kernel and passt peers)"))
            continue
        added, passt_added = mine.median - kernel.median, passt.median - kernel.median
        if passt_added <= 0:
            verdicts.append((None, f"{peer}: passt adds nothing over the kernel path"))
            continue
        ratio = added / passt_added
        text = f"{peer} adds {added:.0f} µs vs passt {passt_added:.0f} µs = {ratio:.2f}x"
        verdicts.append((ratio <= 1.5, text))
    goal = "TCP round-trip p50 added by nitro-netd ≤ 1.5x passt's (added: p50 minus the kernel "
    goal += f"path's p50, {fmt(kernel.median)} µs here)" if kernel is not None else "path's p50)"
    out.append(line(goal, verdicts))
    # 5. idle flows and parent memory.
    verdicts = []
    count = settings.idle_count
    for peer in ours:
        rss, usable = get(peer, "idle_rss_open_mb"), get(peer, "idle_usable")
        if rss is None or usable is None:
            verdicts.append((None, f"{peer} n/a"))
            continue
        every_run = usable.n == settings.runs and rss.n == settings.runs
        ok = every_run and usable.low >= count and rss.median < RSS_TARGET_MB
        text = (
            f"{peer} {fmt(rss.median)} MB with all open (max {fmt(rss.high)}), "
            f"{usable.low:.0f} of {count} usable in the worst run"
        )
        if not every_run:
            text += f" (figures from {min(usable.n, rss.n)} of {settings.runs} runs)"
        verdicts.append((ok if count >= IDLE_COUNT else None, text))
    goal = f"{IDLE_COUNT} idle flows with parent RSS < {RSS_TARGET_MB:.0f} MB"
    if count < IDLE_COUNT:
        goal += f" (only {count} flows measured)"
    out.append(line(goal, verdicts))
    # 6. UDP loss at the target rate.
    verdicts = []
    at_target = settings.udp_rate.upper() == DEFAULT_UDP_RATE
    for peer in ours:
        loss, rate = get(peer, "udp_loss_pct"), get(peer, "udp_gbps")
        if loss is None:
            verdicts.append((None, f"{peer} n/a"))
            continue
        text = f"{peer} {fmt(loss.median)} % loss (max {fmt(loss.high)})"
        if rate is not None:
            text += f", {fmt(rate.median * 1000)} Mbit/s received"
        verdicts.append((loss.median < UDP_LOSS_TARGET_PCT if at_target else None, text))
    goal = f"UDP at 500 Mbit/s with < {UDP_LOSS_TARGET_PCT:g} % loss"
    if not at_target:
        goal += f" (measured at {settings.udp_rate}bit/s instead)"
    out.append(line(goal, verdicts))
    return out


def machine_info() -> dict[str, str]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
        return (
            (out.stdout or out.stderr).strip().splitlines()[0] if out.stdout or out.stderr else ""
        )

    passt_version = "not installed"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        dpkg = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "passt"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        if dpkg.returncode == 0:
            passt_version = f"Debian package {dpkg.stdout.strip()}"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iperf3": version(["iperf3", "--version"]),
        "passt": passt_version,
        "tcp_congestion_control": congestion_control(),
        "source": source_version(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def congestion_control() -> str:
    """The machine's default TCP congestion control (every sender in the simulator uses it:
    a namespace inherits it)."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


def source_version() -> str:
    """The commit and whether src/ differs from it (the package is installed editable, so
    the daemon and agent run whatever src/ holds when each simulator starts)."""
    root = BENCH_DIR.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if not head:
        return "unknown"
    return f"{head} (src/ modified: {len(dirty.splitlines())} files)" if dirty else head


def error_lines(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[tuple[str, str, str], list[int]] = {}
    for record in records:
        for workload, message in record["errors"].items():
            key = (record["peer"], workload, message.splitlines()[0][:240] if message else "")
            seen.setdefault(key, []).append(record["run"])
    return [
        f"- {peer} / {workload} (run {', '.join(map(str, runs))}): {message}"
        for (peer, workload, message), runs in seen.items()
    ]


def render_markdown(
    *,
    summary: dict[str, dict[str, Figure]],
    peers: list[Peer],
    skipped: list[str],
    records: list[dict[str, Any]],
    settings: Settings,
    meta: dict[str, Any],
    plots: list[str],
    plot_note: str | None,
) -> str:
    names = [p.name for p in peers]
    out = [
        "# nitro-netd benchmark results",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']['nproc']} cores ({meta['machine']['cpu']}), "
        f"kernel {meta['machine']['kernel']}, Python {meta['machine']['python']}, "
        f"{meta['machine']['iperf3']}, passt {meta['machine']['passt']}, "
        f"TCP congestion control {meta['machine'].get('tcp_congestion_control', '?')}, "
        f"load average before {meta['machine']['load_before']}",
        f"- runs per figure: {settings.runs} (interleaved: every peer once per run, order "
        f"rotated); iperf3 -t {settings.seconds}; {settings.rr_rounds} round trips; "
        f"{settings.crr_count} connections; UDP at {settings.udp_rate}bit/s, "
        f"{settings.udp_length}-byte datagrams; {settings.idle_count} idle TCP flows",
        f"- source: {meta['machine']['source']}",
        f"- total time: {meta['seconds']:.0f} s",
        "",
        "Cells: median (min-max over the runs) · ratio to passt's median in the same "
        "invocation. Compare ratios, not absolute numbers, on this noisy 2-core machine.",
        "",
        table(summary, names, settings),
        "",
        "## Targets (from the issue)",
        "",
        "Judged on the medians above.",
        "",
        *targets(summary, names, settings),
        "",
        "## Peers",
        "",
        *[f"- **{p.name}**: {p.description}" for p in peers],
        *[f"- skipped: {note}" for note in skipped],
        "",
        "## Notes",
        "",
        "- All processes share the machine's 2 cores: iperf3 client and server, the parent "
        "engine and the agent's two pump processes compete for them.",
        "- The world's veth takes each packet in on the CPU its sender runs on: a sender "
        "moving between the 2 CPUs has its packets reordered, and retransmits spuriously "
        "(hundreds of times per 1-stream world→enclave run, for every peer; a cubic sender "
        "loses more speed to that than a bbr one). Spreading flows by hash (RPS) prevents "
        "it, but cost every peer more here (up to half) than the reordering does.",
        "- Latency: a Python client/server (bench/nettool.py) doing 1-byte round trips over one "
        "TCP connection with TCP_NODELAY, because sockperf is not packaged in Debian 12; the "
        "Python overhead is included and is the same for every peer.",
        "- Connection rate: sequential connect, 1-byte round trip, close (like netperf TCP_CRR).",
        "- CPU s/GB: user+system seconds of the parent engine's and the agent's process trees "
        "(/proc/PID/stat, children included) across the 1-stream iperf3 run, divided by the "
        "bytes iperf3 received. The kernel peer's cost is softirq time not attributed to a "
        "process, so it has no figure.",
        f"- Idle flows: an asyncio client in the enclave opens {settings.idle_count} TCP "
        f"connections to an asyncio echo server in the world ({IDLE_CONCURRENCY} connects in "
        "flight at most; time to open all of them), holds them all idle, and then checks "
        "every one (not a sample) with a 1-byte echo; an open phase longer than "
        f"{IDLE_OPEN_TIMEOUT:g} s is aborted and reported. Parent engine RSS: the sum of "
        "VmRSS (/proc/PID/status) over the daemon's or passt's process tree, just before "
        "the client starts and 1 s after all are open; kernel socket buffers are not in it. "
        "The kernel peer has no engine process, so no RSS figure. MB = 10^6 bytes.",
        "- n/a: the peer did not produce the figure; the reason is under Errors.",
    ]
    loads = [r["load1_before"] for r in records if "load1_before" in r]
    if loads:
        out.append(
            f"- 1-minute load average at the start of each peer run: {min(loads):.2f}-"
            f"{max(loads):.2f} (on 2 cores; above ~0.5 something else was running and the "
            "absolute figures are lower than on an idle machine)."
        )
    sources: dict[str, list[str]] = {}
    for record in records:
        if "source" in record:
            sources.setdefault(record["source"], []).append(f"{record['peer']} run {record['run']}")
    if len(sources) > 1:
        states = "; ".join(f"{source} in {', '.join(runs)}" for source, runs in sources.items())
        out.append(
            "- **src/ changed during this invocation** (the daemon and agent run src/ as it is "
            f"when each peer run starts), so the runs mix code states: {states}"
        )
    notes = sorted({note for r in records for note in r.get("notes", [])})
    out.extend(f"- {note}" for note in notes)
    if plot_note:
        out.append(f"- {plot_note}")
    errors = error_lines(records)
    if errors:
        out += ["", "## Errors", "", *errors]
        for record in records:
            if record.get("diagnostics"):
                out.append(
                    f"- after the errors, {record['peer']} run {record['run']} "
                    f"(pid:state:wait channel, CPU over 1 s): "
                    + "; ".join(
                        f"{name} {d['cpu_percent_over_1s']} % [{', '.join(d['processes'])}]"
                        for name, d in record["diagnostics"].items()
                    )
                )
    if plots:
        out += ["", "## Plots", "", *[f"![{Path(p).stem}]({Path(p).name})" for p in plots]]
    return "\n".join(out) + "\n"


def make_plots(
    summary: dict[str, dict[str, Figure]], peers: list[str], out_dir: Path
) -> tuple[list[str], str | None]:
    """Grouped bar plots (median, min-max error bars), one PNG per metric group."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return [], "plots skipped: matplotlib not installed (pip install -e '.[bench]')"
    written: list[str] = []
    groups: dict[str, list[Metric]] = {}
    for metric in METRICS:
        if any(metric.key in summary[p] for p in peers):
            groups.setdefault(metric.group, []).append(metric)
    for group, metrics in groups.items():
        units = sorted({m.unit for m in metrics})
        fig, axes = plt.subplots(
            1, len(units), figsize=(4 + 2.2 * len(metrics), 4.2), squeeze=False
        )
        for ax, unit in zip(axes[0], units, strict=True):
            chosen = [m for m in metrics if m.unit == unit]
            width = 0.8 / max(1, len(peers))
            for index, peer in enumerate(peers):
                xs, heights, low, high = [], [], [], []
                for position, metric in enumerate(chosen):
                    figure = summary[peer].get(metric.key)
                    if figure is None:
                        continue
                    xs.append(position + (index - (len(peers) - 1) / 2) * width)
                    heights.append(figure.median)
                    low.append(figure.median - figure.low)
                    high.append(figure.high - figure.median)
                # A fixed colour per peer: a peer without figures in one panel (the kernel
                # has no engine process) must not shift the colours of the others.
                ax.bar(
                    xs, heights, width, yerr=[low, high], capsize=3, label=peer, color=f"C{index}"
                )
            ax.set_xticks(range(len(chosen)))
            ax.set_xticklabels([textwrap.fill(m.label, 22) for m in chosen], fontsize=7)
            ax.set_ylabel(unit)
            ax.grid(axis="y", alpha=0.3)
        handles = [Patch(color=f"C{index}", label=peer) for index, peer in enumerate(peers)]
        axes[0][0].legend(handles=handles, fontsize=7)
        fig.suptitle(f"nitro-netd bench: {group} (median, min-max)")
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written, None


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 run, 2 s iperf3, fewer rounds")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; --quick 1)")
    parser.add_argument("--seconds", type=int, help="iperf3 -t (default 5; --quick 2; max 5)")
    parser.add_argument(
        "--peers",
        default="nitro-netd,passt,kernel,gvproxy,gvforwarder",
        help="comma list of nitro-netd, passt, kernel, gvproxy, gvforwarder (gvproxy "
        f"needs {ENV_GVPROXY}; gvforwarder also {ENV_GVFORWARDER}; default: all)",
    )
    parser.add_argument(
        "--mtu",
        default=",".join(map(str, DEFAULT_MTUS)),
        help="comma list of MTUs for nitro-netd (default: 65520,1500)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help=f"comma list of {', '.join(ALL_WORKLOADS)} (default: all)",
    )
    parser.add_argument(
        "--udp-rate",
        default=DEFAULT_UDP_RATE,
        help=f"iperf3 -b for UDP (default {DEFAULT_UDP_RATE}, the issue's target rate)",
    )
    parser.add_argument(
        "--idle-conns",
        type=int,
        help=f"idle TCP flows to hold (default {IDLE_COUNT}; --quick 1000)",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results dir")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = host_problem(["iperf3"])
    if problem is not None:
        print(f"bench/run.py: {problem}", file=sys.stderr)
        return 1
    workloads = tuple(w for w in args.workloads.split(",") if w)
    unknown = set(workloads) - set(ALL_WORKLOADS)
    if unknown:
        print(f"bench/run.py: unknown workloads {sorted(unknown)}", file=sys.stderr)
        return 2
    settings = Settings(
        runs=args.runs or (1 if args.quick else 3),
        seconds=min(5, args.seconds or (2 if args.quick else 5)),
        rr_rounds=300 if args.quick else 2000,
        crr_count=100 if args.quick else 500,
        udp_rate=args.udp_rate,
        udp_length=1400,
        idle_count=args.idle_conns or (1000 if args.quick else IDLE_COUNT),
        workloads=workloads,
    )
    mtus = [int(m) for m in args.mtu.split(",") if m]
    peers, skipped = build_peers([p for p in args.peers.split(",") if p], mtus)
    for note in skipped:
        print(f"skipped {note}", flush=True)
    if not peers:
        print("bench/run.py: no peer to run", file=sys.stderr)
        return 2

    out_dir: Path = args.out
    raw_dir = out_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stamp = dt.datetime.now(dt.UTC)
    meta: dict[str, Any] = {
        "date": stamp.strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(),
        "settings": asdict(settings),
        "peers": [p.name for p in peers],
        "skipped": skipped,
    }
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)  # unwind like Ctrl-C: simulators removed, JSON kept
    records: list[dict[str, Any]] = []
    raw_path = raw_dir / f"{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    interrupted = False
    try:
        for run in range(1, settings.runs + 1):
            shift = (run - 1) % len(peers)
            for peer in peers[shift:] + peers[:shift]:
                print(f"run {run}/{settings.runs}: {peer.name} ...", end=" ", flush=True)
                record = run_peer_once(peer, settings, run)
                records.append(record)
                shown = ", ".join(f"{k}={fmt(v)}" for k, v in record["metrics"].items())
                print(shown or "no figures", flush=True)
                for workload, message in record["errors"].items():
                    print(f"    {workload}: {message.splitlines()[0][:200]}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: simulators removed; writing what was measured", file=sys.stderr)
    meta["seconds"] = time.monotonic() - started
    meta["interrupted"] = interrupted
    raw_path.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")

    names = [p.name for p in peers]
    summary = summarise(records, names)
    plots: list[str] = []
    plot_note = "plots skipped (--no-plots)" if args.no_plots else None
    if not args.no_plots:
        plots, plot_note = make_plots(summary, names, out_dir)
    markdown = render_markdown(
        summary=summary,
        peers=peers,
        skipped=skipped,
        records=records,
        settings=settings,
        meta=meta,
        plots=plots,
        plot_note=plot_note,
    )
    (out_dir / "RESULTS.md").write_text(markdown, encoding="utf-8")
    print()
    print(table(summary, names, settings))
    print()
    print("\n".join(targets(summary, names, settings)))
    print(f"\nwritten: {out_dir / 'RESULTS.md'}, {raw_path}" + "".join(f", {p}" for p in plots))
    if plot_note:
        print(plot_note)
    return 130 if interrupted else 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())

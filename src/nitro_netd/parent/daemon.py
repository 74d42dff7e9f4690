"""Run the parent daemon: listen for the enclave's link and serve it until told to stop.

Theory of operation
-------------------
`Daemon.start()` brings the daemon up in an order that makes "ready" mean ready: the
pcap file, the exposed ports, the first ``nitro-cli`` poll (so pinning holds from the first
link), the link listener, the control socket and the metrics listener. If any step fails,
everything opened so far is closed again and the `OSError` (one line naming what failed)
propagates: nothing is left behind. `Daemon.close()` undoes it all: listeners close, the
live link and its flows are reset, the control and unix link sockets are removed and the
pcap is flushed.

`run()` is the process around it: the pidfile lock (single instance per name), signal
handlers (SIGTERM/SIGINT stop it cleanly, exit 0; SIGHUP reopens the log, or stops it
like SIGTERM when it logs to a terminal that hung up; SIGUSR1 logs the flows; both are
ignored before serving starts and after it ends, when their default action would kill the
daemon without clean-up), readiness reporting to a launching process
(`--daemonize`) and to systemd (``READY=1``/``STOPPING=1``). ``--exit-with-enclave`` stops
it the same way once the followed enclave is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

from nitro_netd.netstack import StackConfig
from nitro_netd.parent.bridge import Bridge
from nitro_netd.parent.busy_poll import DEFAULT_WINDOW, BusyPoll
from nitro_netd.parent.control import ControlServer, StatusInputs, status_getter
from nitro_netd.parent.enclave_watch import DEFAULT_POLL, EnclaveWatcher, PinVerdict, decide_pin
from nitro_netd.parent.expose import ExposeSpec, TcpExposer, UdpExposer
from nitro_netd.parent.host_ping import HostPing
from nitro_netd.parent.host_tcp import READ_SIZE_LARGE, SPLICE_FLOWS, HostTcp, read_size_for
from nitro_netd.parent.host_udp import HostUdp
from nitro_netd.parent.lifecycle import PidLock, Readiness, StatePaths
from nitro_netd.parent.metrics import MetricsServer
from nitro_netd.parent.notify import notify_ready, notify_stopping
from nitro_netd.parent.pcap import DEFAULT_MAX_BYTES as DEFAULT_PCAP_MAX_BYTES
from nitro_netd.parent.pcap import PcapWriter
from nitro_netd.parent.resolvconf import with_parent_resolvers
from nitro_netd.parent.session import LinkSession
from nitro_netd.parent.splice import available as splice_available
from nitro_netd.transport import Endpoint, open_listener, parse_endpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything `run()` needs, built from the command line."""

    listen: Endpoint = field(default_factory=lambda: parse_endpoint("vsock://:1024"))
    """Where agents connect."""
    stack: StackConfig = field(default_factory=StackConfig)
    """The netstack's address plan, MTU, limits and timeouts."""
    exposes: tuple[ExposeSpec, ...] = ()
    """Parent ports carried into the enclave (--expose)."""
    name: str | None = None
    """The enclave's name (--enclave-name): names the state and the enclave to follow."""
    state: StatePaths | None = None
    """Where the pidfile and control socket go; None for neither (tests, ad-hoc runs)."""
    nitro_cli: str | None = None
    """The nitro-cli to follow the named enclave with; None: not following (no pinning)."""
    enclave_poll: float = DEFAULT_POLL
    """Seconds between nitro-cli polls."""
    exit_with_enclave: bool = False
    """Stop once the followed enclave is gone."""
    pcap: Path | None = None
    """Write every link frame here (--pcap)."""
    pcap_max_bytes: int | None = DEFAULT_PCAP_MAX_BYTES
    """Stop the capture before the file grows past this (--pcap-max-mb; None: no limit)."""
    metrics_listen: tuple[str, int] | None = None
    """Serve Prometheus metrics on this address (--metrics-listen)."""
    busy_poll: float = DEFAULT_WINDOW
    """Seconds the loop keeps polling after each burst of work (--busy-poll-us; 0: off)."""
    splice_flows: int = SPLICE_FLOWS
    """At most this many bulk flows to the enclave splice their bytes instead of copying
    them at a time (--splice-flows; 0: none)."""


class Daemon:
    """The daemon's sockets and helpers; see the module docstring."""

    def __init__(self, config: DaemonConfig, stop: asyncio.Event) -> None:
        self.config = config
        self.stop = stop
        self.loop = asyncio.get_running_loop()
        self.bridge = Bridge(with_parent_resolvers(config.stack), self.loop)
        if config.busy_poll:
            self.bridge.busy_poll = BusyPoll(self.loop, config.busy_poll)
        count_drop = self.bridge.stack.stats.count_drop
        self.host_tcp = HostTcp(self.loop, self.bridge.post_event, count_drop)
        self.host_tcp.splice_limit = config.splice_flows
        self.bridge.add_host_side(self.host_tcp)
        self.bridge.link_observers.append(self._on_new_link)
        self.bridge.add_host_side(HostUdp(self.loop, self.bridge.post_event, count_drop))
        self.bridge.add_host_side(HostPing(self.loop, self.bridge.post_event, count_drop))
        self.bridge.admit_link = self.admit
        self.exposer = TcpExposer(
            self.loop,
            self.host_tcp.adopt,
            self.bridge.post_event,
            lambda: self.bridge.session is not None,
        )
        self.udp_exposer = UdpExposer(self.loop, self.bridge.post_event)
        self.bridge.add_host_side(self.udp_exposer)
        self.watcher = self._make_watcher()
        self.inputs = StatusInputs(
            self.bridge, str(config.listen), config.name, config.exposes, self.watcher,
            str(config.pcap) if config.pcap else None, time.time(), time.monotonic(),
            self.host_tcp, str(config.state.directory) if config.state else None,
        )  # fmt: skip
        self.status = status_getter(self.inputs)
        self.pcap: PcapWriter | None = None
        self.server: asyncio.Server | None = None
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None

    def _on_new_link(self, session: LinkSession) -> None:
        self.host_tcp.read_size = read_size_for(self.config.stack.mtu, session.segmentation_offload)
        self.host_tcp.splice_enabled = (
            self.config.splice_flows > 0
            and splice_available()
            and self.host_tcp.read_size == READ_SIZE_LARGE  # frames of ~64 KiB, not 1500
            and session.checksum_offload  # the stack cannot sum bytes it does not hold
            and self.bridge.frame_tap is None  # nor can a capture see them
        )

    def _make_watcher(self) -> EnclaveWatcher | None:
        c = self.config
        if c.name is not None and c.nitro_cli is None:
            logger.info("nitro-cli not found: links are not pinned to enclave %s's CID", c.name)
        if c.name is None or c.nitro_cli is None:
            return None
        on_gone = self._enclave_gone if c.exit_with_enclave else None
        return EnclaveWatcher(c.name, c.nitro_cli, interval=c.enclave_poll, on_gone=on_gone)

    async def start(self) -> None:
        """Open everything, in order; on failure close what was opened and re-raise.

        Raises:
            OSError: something could not be opened (the message names it).
        """
        try:
            await self._open_all()
        except BaseException:
            await self.close()
            raise

    async def _open_all(self) -> None:
        c = self.config
        if c.pcap is not None:
            self.pcap = _open_pcap(c.pcap, c.pcap_max_bytes)
            self.bridge.frame_tap = self.pcap.write
        self.exposer.open(c.exposes)
        self.udp_exposer.open(c.exposes)
        if self.watcher is not None:
            await self.watcher.poll_once()
            self.watcher.start()
        self.server = await self.loop.create_server(
            self.bridge.new_session, sock=open_listener(c.listen)
        )
        logger.info("listening on %s (mtu %d)", c.listen, c.stack.mtu)
        if c.state is not None:
            self.control = ControlServer(c.state.control, self.status)
            await self.control.start()
        if c.metrics_listen is not None:
            self.metrics = MetricsServer(*c.metrics_listen, self.status)
            await self.metrics.start()

    async def close(self) -> None:
        """Close listeners, reset the link and its flows, remove socket files (idempotent)."""
        if self.server is not None:
            self.server.close()
        for helper in (self.control, self.metrics, self.watcher):
            if helper is not None:
                await helper.close()
        self.exposer.close()
        self.udp_exposer.close()
        self.bridge.close()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None
            _remove_unix_socket(self.config.listen)
        if self.pcap is not None:
            self.pcap.close()
            self.bridge.frame_tap = None

    def admit(self, session: LinkSession, cid: int | None) -> str | None:
        """The pinning check before a link goes live: None, or why it is refused."""
        watcher = self.watcher
        verdict = decide_pin(
            following=watcher is not None,
            enclave_cid=watcher.cid if watcher else None,
            peer_cid=cid,
        )
        if verdict is PinVerdict.NOT_VSOCK and watcher is not None:
            logger.debug("link from %s: a unix link has no CID; not pinned", session.peer)
        if verdict is not PinVerdict.REFUSE or watcher is None:
            return None
        watcher.poll_soon()
        expected = f"CID {watcher.cid}" if watcher.cid is not None else "not running"
        reason = f"refused: CID {cid} is not enclave {watcher.name!r} ({expected})"
        logger.warning("link from %s: %s", session.peer, reason)
        return reason

    def _enclave_gone(self) -> None:
        logger.info(
            "enclave %s is gone and --exit-with-enclave was given: stopping", self.config.name
        )
        self.stop.set()


def _open_pcap(path: Path, max_bytes: int | None) -> PcapWriter:
    try:
        return PcapWriter(path, max_bytes=max_bytes)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write --pcap {path}: {exc.strerror}") from exc


SERVING_SIGNALS: Final = (signal.SIGUSR1, signal.SIGHUP)
"""Signals acted on only while serving (`serve`); ignored before and after."""


async def serve(
    config: DaemonConfig,
    stop: asyncio.Event,
    on_ready: Callable[[], None] | None = None,
    on_stopping: Callable[[], object] | None = None,
    on_sighup: Callable[[], None] | None = None,
) -> None:
    """Listen and bridge until `stop` is set; call `on_ready` once everything is bound.

    While serving, SIGUSR1 logs the flows and SIGHUP calls `on_sighup` (the CLI's
    `lifecycle.reopen_log`; None, logging to stderr: a terminal that hung up stops the
    daemon, as SIGTERM; otherwise only logged).

    Raises:
        OSError: a listener cannot be opened (message names it); nothing stays open.
    """
    daemon = Daemon(config, stop)
    await daemon.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, _log_flows, daemon)
    on_terminal = _stderr_is_a_terminal()  # (not once it hung up: isatty then fails)
    loop.add_signal_handler(
        signal.SIGHUP, on_sighup or partial(_sighup_on_stderr, stop, on_terminal=on_terminal)
    )
    try:
        if on_ready is not None:
            on_ready()
        await stop.wait()
    finally:
        logger.info("stopping")
        if on_stopping is not None:
            on_stopping()
        for signum in SERVING_SIGNALS:
            loop.remove_signal_handler(signum)
            signal.signal(signum, _ignore_signal)  # not the default: that terminates
        await daemon.close()
        logger.info("counters: %s", daemon.bridge.stack.stats.snapshot())


def _ignore_signal(signum: int, frame: object) -> None:
    """A signal that is not acted on now (reset to the default in programs we run)."""


def _sighup_on_stderr(stop: asyncio.Event, *, on_terminal: bool) -> None:
    """SIGHUP while logging to stderr: on a terminal, it hung up (the session that
    started a foreground daemon ended): stop cleanly; otherwise there is nothing to do."""
    if on_terminal:
        logger.info("SIGHUP: the terminal hung up: stopping")
        stop.set()
    else:
        logger.info("SIGHUP: logging to stderr, nothing to reopen")


def _stderr_is_a_terminal() -> bool:
    try:
        return os.isatty(2)
    except OSError:
        return False


def _log_flows(daemon: Daemon) -> None:
    """SIGUSR1: log every TCP flow's state and the counters (for operators debugging)."""
    tcp = daemon.bridge.stack.tcp
    logger.info(
        "SIGUSR1: %d TCP flows; counters %s", len(tcp.flows), daemon.bridge.stack.stats.snapshot()
    )
    for conn in tcp.flows.values():
        conn.log.info("%s", conn.describe())


def _remove_unix_socket(endpoint: Endpoint) -> None:
    if endpoint.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint.path)


def run(
    config: DaemonConfig,
    readiness: Readiness | None = None,
    on_sighup: Callable[[], None] | None = None,
) -> int:
    """Run the daemon until SIGTERM, SIGINT or the enclave's end; return the exit status.

    Args:
        on_sighup: what SIGHUP does while serving (reopen the log file).
    Raises:
        AlreadyRunning: another daemon holds this name's pidfile.
        LifecycleError: the state directory cannot be created.
        OSError: something could not be opened; nothing is left behind.
    """
    # SIGUSR1 and SIGHUP act once serving; before (a slow nitro-cli at start) and after,
    # their default action would kill the daemon without cleaning up. A handler that does
    # nothing, not SIG_IGN: programs the daemon runs (nitro-cli) must not inherit an
    # ignored signal.
    for signum in SERVING_SIGNALS:
        signal.signal(signum, _ignore_signal)
    lock = PidLock.acquire(config.state.pidfile, config.state.name) if config.state else None
    raise_file_limit(files_wanted(config))
    keep_large_buffers_on_heap()
    try:
        _run_loop(_main(config, readiness, on_sighup))
    finally:
        if lock is not None:
            lock.release()
    return 0


FILES_SPARE: Final = 256
"""Descriptors beyond one per flow and exposed port: listeners, the link, pipes, logs."""
FILES_PER_SPLICING_FLOW: Final = 8
"""A splicing flow's pipes: one for fresh bytes and those keeping unacknowledged ones
(two to four of 1 MiB each were seen), two descriptors each."""


def files_wanted(config: DaemonConfig) -> int:
    """The open-files limit the daemon asks for: a socket per flow (up to the flow
    limits) and per exposed port (a wide range, 10000-40000, needs as many), the pipes of
    the flows that may splice at once, plus spare."""
    stack = config.stack
    sockets = stack.max_tcp_flows + stack.max_udp_flows + len(config.exposes)
    return sockets + config.splice_flows * FILES_PER_SPLICING_FLOW + FILES_SPARE


def raise_file_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards `wanted` (one socket per flow); return it.

    A default soft limit of 1024 would make connects fail with EMFILE long before the flow
    limits are reached. Logged when even the hard limit is too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        logger.info(
            "open-files limit %d is below the %d that the flow limits and exposed ports could"
            " need (ulimit -n)",
            soft,
            wanted,
        )
    return int(soft)


_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_MALLOC_MMAP_THRESHOLD: Final = 8 << 20
_MALLOC_TRIM_THRESHOLD: Final = 64 << 20


def keep_large_buffers_on_heap() -> bool:
    """Ask glibc to serve the data path's large buffers from the heap; True if it agreed.

    Every host-socket read allocates a buffer of `HostTcp.read_size` (256 KiB or 1 MiB,
    `read_size_for`) and shrinks it to the bytes read.
    glibc's default maps a fresh region for such a buffer and unmaps it when freed: three
    system calls and a page fault per 4 KiB on every read (a 1-byte round trip paid
    about 35 us for them). With the thresholds raised, the buffers come from the
    heap and are reused. Without glibc (musl, another platform) nothing changes.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, _MALLOC_MMAP_THRESHOLD))
    return bool(mallopt(_M_TRIM_THRESHOLD, _MALLOC_TRIM_THRESHOLD)) and done


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the daemon's loop: uvloop when installed (the `fast` extra), else asyncio's own.

    `NITRO_NETD_LOOP=asyncio` forces the standard loop.
    """
    if os.environ.get("NITRO_NETD_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            logger.debug("event loop: uvloop")
            uvloop.run(main)
            return
    asyncio.run(main)


async def _main(
    config: DaemonConfig, readiness: Readiness | None, on_sighup: Callable[[], None] | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_ready() -> None:
        logger.info("ready (pid %d)", os.getpid())
        notify_ready(f"listening on {config.listen}")
        if readiness is not None:
            readiness.ready()

    await serve(config, stop, on_ready, notify_stopping, on_sighup)

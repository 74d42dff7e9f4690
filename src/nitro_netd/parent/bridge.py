"""The bridge: the one place that drives the sans-IO netstack.

Theory of operation
-------------------
The bridge owns the `NetStack`, the current `LinkSession` and (later) the host sockets.
Every input reaches the stack through here (frames from the link, events from host
sockets, timer expiry) and after each batch of input the bridge *flushes*: it drains the
stack's frames into the link in one write, hands its commands to the host side, and
re-arms a single timer at `stack.get_timer()` (the aioquic `transmit()` pattern) when
that is earlier than the armed one: a later or no deadline keeps the armed timer, which
then fires early, finds nothing due and re-arms. A request/response exchange moves the
deadline twice per round trip (a delayed ACK is due, then a retransmission): lazily that
costs a spurious wake-up at most every half millisecond instead of two re-arms per round
trip (about 4 of 45 µs of the daemon's CPU per round trip, `bench/inproc_rtt.py`). Then
it kicks the busy poller, if any, which keeps the loop awake a little while for the next
input (`busy_poll`).

At most one link is live. A new link replaces the old one: the old session is closed and
the stack forgets the old link's state (flows of the old link are reset). Two agents that
keep replacing each other's link would do so for ever: `LinkFlapping` warns about it.
Before a link goes live the daemon may refuse it (`admit_link`, CID pinning); a refused
link never disturbs the live one. `link` records what `nitro-netd status` shows, and
`frame_tap` (``--pcap``) sees every frame of the live link, both directions.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from nitro_netd.frames.errors import DropReason
from nitro_netd.link import HEADER_MTU
from nitro_netd.netstack import NetStack, StackConfig
from nitro_netd.netstack.events import (
    HostCommand,
    HostEvent,
    PingFailed,
    TcpData,
    TcpFailed,
    UdpFailed,
)
from nitro_netd.netstack.output import SplitFrame
from nitro_netd.parent.busy_poll import BusyPoll
from nitro_netd.parent.host import HostSide
from nitro_netd.parent.session import LinkSession, not_live_log
from nitro_netd.transport import peer_cid

logger = logging.getLogger(__name__)

MAX_PENDING_LINKS: Final = 16
"""Connections waiting for their handshake at most; a new one closes the oldest. (A silent
connection is kept, as it may be a quiet qemu-framed agent: without a bound, a local
process could hold descriptors for ever.)"""
DEFERRED_FLUSH_BYTES: Final = 64 * 1024
"""Host reads at least this large are flushed at the end of the loop turn (`post_event`)."""
FLAP_COUNT: Final = 3
"""This many replacements of the live link within `FLAP_WINDOW` seconds is flapping."""
FLAP_WINDOW: Final = 10.0
FLAP_WARNING_INTERVAL: Final = 60.0
"""Seconds between two flapping warnings."""

FrameTap = Callable[[bytes | bytearray | memoryview], None]
AdmitLink = Callable[[LinkSession, "int | None"], "str | None"]


@dataclass(slots=True)
class LinkState:
    """The link as status reports it."""

    up: bool = False
    peer: str | None = None
    """The live (or last) link's peer, e.g. "cid 16 port 1234" or "unix peer"."""
    cid: int | None = None
    """Its vsock CID; None for unix links."""
    since: float | None = None
    """Wall-clock time of the last change (up or down)."""
    accepted: int = 0
    refused: int = 0


class LinkFlapping:
    """Notices the live link being replaced `FLAP_COUNT` times within `FLAP_WINDOW` seconds
    (two agents, or two enclaves, connecting to one daemon replace each other for ever)."""

    def __init__(self) -> None:
        self._replaced: deque[float] = deque()
        self._next_warning = -math.inf

    def on_replaced(self, *, now: float) -> str | None:
        """Count one replacement at `now`; return the warning to log, at most once per
        `FLAP_WARNING_INTERVAL`, or None."""
        self._replaced.append(now)
        while self._replaced[0] <= now - FLAP_WINDOW:
            self._replaced.popleft()
        if len(self._replaced) < FLAP_COUNT or now < self._next_warning:
            return None
        self._next_warning = now + FLAP_WARNING_INTERVAL
        return (
            f"link flapping: replaced {len(self._replaced)} times in {FLAP_WINDOW:.0f} s "
            "(is more than one agent connecting to this daemon?)"
        )


class Bridge:
    """Connects the netstack to the link (and to host sockets)."""

    def __init__(self, config: StackConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.stack = NetStack(config, isn_seed=secrets.randbits(32))
        self.session: LinkSession | None = None
        self.host_sides: list[HostSide] = []
        self._executors: dict[type, Callable[[Any], None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.link = LinkState()
        self.admit_link: AdmitLink | None = None
        """Asked before a new link goes live: a returned reason refuses (closes) it."""
        self.frame_tap: FrameTap | None = None
        """Sees every frame of the live link, both directions (valid during the call)."""
        self.link_observers: list[Callable[[LinkSession], None]] = []
        """Called with each new live link, once its offloads are known."""
        self.busy_poll: BusyPoll | None = None
        """Kicked after every flush (``--busy-poll-us``); None: the loop sleeps at once."""
        self._moved = 0
        """Link bytes both ways at the last flush (how much each flush moved)."""
        self._flush_scheduled = False
        """A flush is queued for the end of this loop turn (`post_event`)."""
        self._pending: dict[LinkSession, None] = {}
        """Connections not live yet, oldest first."""
        self.not_live = not_live_log()
        """Logs connections that end before becoming the link (throttled)."""
        self.flapping = LinkFlapping()
        """Warns when links keep replacing each other."""

    # --- LinkOwner -------------------------------------------------------------

    def new_session(self) -> LinkSession:
        """Protocol factory for the link listener (see `MAX_PENDING_LINKS`)."""
        session = LinkSession(self, max_frame=self.config.mtu + 14, not_live=self.not_live)
        session.on_closed = self._forget_pending
        self._pending[session] = None
        if len(self._pending) > MAX_PENDING_LINKS:
            oldest = next(iter(self._pending))
            oldest.close(f"more than {MAX_PENDING_LINKS} connections waiting for a handshake")
        return session

    def _forget_pending(self, session: LinkSession) -> None:
        self._pending.pop(session, None)

    def link_plan(self) -> Mapping[str, str]:
        """The network plan, for agents that ask for a reply."""
        c = self.config
        return {
            HEADER_MTU: str(c.mtu),
            "Nitro-Netd-Address": f"{c.enclave_ip}/{c.subnet.prefixlen}",
            "Nitro-Netd-Gateway": str(c.gateway_ip),
            "Nitro-Netd-Mac": str(c.enclave_mac),
        }

    def on_link_up(self, session: LinkSession) -> None:
        """Make `session` the live link, replacing any older one (unless refused)."""
        self._pending.pop(session, None)
        cid = _session_cid(session)
        refusal = self.admit_link(session, cid) if self.admit_link is not None else None
        if refusal is not None:
            self.link.refused += 1
            session.close(refusal)
            return
        self.link.up, self.link.peer, self.link.cid = True, session.peer, cid
        self.link.since = time.time()
        self.link.accepted += 1
        old, self.session = self.session, session
        if old is not None and not old.closed:
            old.close("replaced by a new link")
            if warning := self.flapping.on_replaced(now=self.loop.time()):
                logger.warning("%s", warning)
        self._set_link_backlogged(False)  # a backed-up old link must not hold the new one
        self.stack.handle_link_reset()
        self.stack.set_checksum_offload(session.checksum_offload)
        self.stack.set_segmentation_offload(session.segmentation_offload)
        self.stack.handle_link_up()
        for observer in self.link_observers:
            observer(session)
        self.flush()

    def offload_allowed(self) -> bool:
        """Agree to checksum offload unless the configuration turned it off."""
        return self.config.checksum_offload

    def segmentation_allowed(self) -> bool:
        """Agree to TCP segmentation offload unless the configuration turned it off."""
        return self.config.segmentation_offload

    def on_frame(self, session: LinkSession, frame: memoryview) -> None:
        """Feed one frame of the live link to the stack."""
        if session is self.session:
            if self.frame_tap is not None:
                self.frame_tap(frame)
            try:
                self.stack.receive_frame(frame, now=self.loop.time())
            except Exception:  # a bug in the stack: keep the link and every other flow
                self.stack.stats.count_drop(DropReason.INTERNAL_ERROR)
                logger.exception("internal error while handling a frame from the enclave")

    def on_frames_done(self, session: LinkSession) -> None:
        """A batch of frames was fed: send the answers."""
        self.flush()

    def on_link_writable(self, session: LinkSession, writable: bool) -> None:
        """Backpressure: stop reading host sockets while the link is backed up."""
        self._set_link_backlogged(not writable and session is self.session)

    def on_link_down(self, session: LinkSession, reason: str) -> None:
        """Forget the link if it was the live one."""
        if session is self.session:
            self.session = None
            self.link.up, self.link.since = False, time.time()
            self._set_link_backlogged(False)
            self.stack.handle_link_reset()
            self.flush()
            for side in self.host_sides:
                side.close_all()

    def _set_link_backlogged(self, backlogged: bool) -> None:
        """Stop (or restart) reading host sockets, and busy polling, while the live link
        to the enclave is backed up."""
        for side in self.host_sides:
            side.set_link_paused(backlogged)
        if self.busy_poll is not None:
            self.busy_poll.set_backlogged(backlogged)

    # --- output --------------------------------------------------------------------

    def flush(self) -> None:
        """Drain the stack: commands to the host, frames to the link, re-arm the timer.

        Commands go first: data for the world is on the critical path of a round trip,
        the ACKs and segments for the enclave follow a few microseconds later.
        """
        commands, frames = self.stack.drain()
        for command in commands:
            self.execute(command)
        if frames and self.session is not None:
            if self.frame_tap is not None:
                for frame in frames:
                    self.frame_tap(bytes(frame) if isinstance(frame, SplitFrame) else frame)
            self.session.send_frames(frames)
        elif frames:
            self.stack.stats.drops[DropReason.NO_LINK] += len(frames)
        self._arm_timer(self.stack.get_timer())
        if self.busy_poll is not None:
            stats = self.stack.stats
            moved = stats.bytes_in + stats.bytes_out
            self.busy_poll.kick(moved - self._moved)
            self._moved = moved

    def add_host_side(self, side: HostSide) -> None:
        """Route the commands `side` declares to it."""
        self.host_sides.append(side)
        for command_type in side.command_types:
            self._executors[command_type] = side.execute

    def post_event(self, event: HostEvent) -> None:
        """Feed one host event to the stack and flush (the host sides' callback).

        A large read of host data (`DEFERRED_FLUSH_BYTES`) is flushed at the end of the
        loop turn instead, so that the reads of every flow readable in the same turn leave
        in one link write: bulk flows cost the daemon and the agent fewer, larger writes.
        Anything else flushes at once: small messages are latency-bound.
        """
        try:
            self.stack.handle_host_event(event, now=self.loop.time())
        except Exception:  # a bug in the stack: log it, keep serving the other flows
            logger.exception("internal error while handling %r", event)
        if type(event) is TcpData and len(event.data) >= DEFERRED_FLUSH_BYTES:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._scheduled_flush)
        else:
            self.flush()

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def execute(self, command: HostCommand) -> None:
        """Carry out a host command through the side that owns its type."""
        executor = self._executors.get(type(command))
        if executor is None:
            logger.error("no host side executes %s", type(command).__name__)
            return
        try:
            executor(command)
        except Exception:  # a bug in a host side: log it, keep the link and other flows
            self.stack.stats.count_drop(DropReason.INTERNAL_ERROR)
            logger.exception("internal error while carrying out %r", command)
            failed = _failure_for(command)
            if failed is not None:  # the flow ends (RST/ICMP), never half-done or stuck
                self.loop.call_soon(self.post_event, failed)

    def _arm_timer(self, when: float | None) -> None:
        armed = self._timer_at
        if when == armed or (armed is not None and (when is None or when > armed)):
            return  # (lazy: the armed timer fires first, finds nothing due, re-arms)
        self._cancel_timer()
        self._timer_at = when
        if when is not None:
            # uvloop keeps time in whole milliseconds and runs a timer due in under half a
            # millisecond at once (call_soon): the stack then found nothing due, re-armed,
            # and spun through handle_timer until the clock ticked (a delayed ACK is due
            # 0.5 ms after a request). Round up: a timer never fires before its deadline.
            delay = math.ceil((when - self.loop.time()) * 1000 - 1e-6) / 1000
            self._timer = self.loop.call_later(max(delay, 0.0), self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.stack.handle_timer(now=self.loop.time())
        except Exception:  # a bug in the stack: log it; the flush re-arms the timer
            logger.exception("internal error while running timers")
        self.flush()

    def close(self) -> None:
        """Close the live link and stop the timer."""
        if self.session is not None:
            self.session.close("daemon stopping")
        for side in self.host_sides:
            side.close_all()
        self._cancel_timer()


def _failure_for(command: HostCommand) -> HostEvent | None:
    """The event that ends the flow of a command a host side failed to carry out (its
    bytes may be half written, or its connect never started): EIO, as for a broken socket."""
    flow = getattr(command, "flow", None)
    if flow is None:
        return None
    name = type(command).__name__
    if name.startswith("Tcp"):
        return TcpFailed(flow, errno.EIO)
    if name.startswith("Udp"):
        return UdpFailed(flow, errno.EIO)
    if name.startswith("Ping"):
        return PingFailed(flow, errno.EIO)
    return None


def _session_cid(session: LinkSession) -> int | None:
    """The link's peer CID (None for unix links or when it cannot be read)."""
    sock = session.transport.get_extra_info("socket") if session.transport else None
    try:
        return peer_cid(sock) if sock is not None else None
    except OSError:
        return None

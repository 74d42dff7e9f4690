"""The agent's outer loop: connect, handshake, pump, and reconnect forever.

Theory of operation
-------------------
The TAP is created and configured once, before the agent starts, and its descriptor is
kept for the agent's whole life, so the interface and its addresses survive every link
session. Each session connects to the parent, runs the `Handshake`, announces "link up"
(a log line, an optional callback and a byte on an optional descriptor), then runs the
two-process pump until either direction ends. Between sessions the agent waits with capped
exponential backoff; the backoff starts again after a session whose link stayed up for
`AgentConfig.stable_after` seconds, so a parent that accepts and at once drops or garbles
the link does not make the agent spin.

Checksum offload: when the TAP carries virtio-net headers, the agent tries once at start
whether it can set the TAP's offloads (``TUNSETOFFLOAD``), and only then asks each gvproxy
session's parent for it (``Nitro-Netd-Offload: csum``). After each handshake, before the
pump starts, it sets the TAP to `TUN_F_CSUM` if the parent agreed and to 0 otherwise, so a
reconnect to a stock peer turns offload off again. If turning it on fails after all, the
session ends and the agent stops asking.

Segmentation offload rides on the same negotiation: if the TAP also takes `TUN_F_TSO4`
(probed once, unless ``--no-tso``), the agent asks for ``csum, tso``, and where the parent
agrees the TAP is set to `TUN_F_CSUM | TUN_F_TSO4` and the pump lets TCP super-segments of
up to 64 KiB through both ways, cut by the enclave's kernel into MTU-sized segments
(``gso_size`` = MTU - 40). A TAP that refuses TSO4 at session time ends that session; the
next one asks for checksum offload alone.

MTU: our daemon states its MTU in its reply, and the agent gives the TAP that MTU for the
session (``SIOCSIFMTU``, between sessions, so the pump never sees a change); a parent that
states none (a stock gvproxy, the qemu framing) gets ``--mtu`` again. A frame larger than
the daemon's MTU would end the link, and every flow with it, again and again. The pump's
frame limit and the GSO segment size follow the link's MTU.

Every wait (backoff, handshake, pump) also watches a self-pipe, so `Agent.stop` (safe to
call from a signal handler) ends the agent promptly. Operator log lines, one per event::

    connecting to unix:///run/nitro-netd.sock (gvproxy framing)
    link up: nitro-netd (protocol version 1) at unix:///run/nitro-netd.sock
    checksum offload on, segmentation offload on
    link lost: parent closed the link
    retry in 0.05 s

Repeats of the same connect failure are logged at debug level.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from nitro_netd.enclave.backoff import Backoff
from nitro_netd.enclave.handshake import Handshake, HandshakeResult, PeerKind, stated_mtu
from nitro_netd.enclave.pump import run_pump
from nitro_netd.enclave.tap import TUN_F_CSUM, TUN_F_TSO4, tap_name
from nitro_netd.enclave.tap import set_mtu as tap_set_mtu
from nitro_netd.enclave.tap import set_offload as tap_set_offload
from nitro_netd.link import DEFAULT_MTU, LinkError, LinkProtocol
from nitro_netd.transport import Endpoint, connect

logger = logging.getLogger("nitro_netd.enclave")

ETHERNET_HEADER: Final = 14
TCP_IPV4_HEADERS: Final = 40
"""IPv4 and TCP headers without options: an MTU-sized segment carries MTU - 40 bytes."""
_FATAL_CONNECT_ERRNOS: Final = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT})
"""Connect errors no retry can fix (no vsock in this kernel)."""
_TAP_GONE_ERRNOS: Final = frozenset({errno.EBADFD, errno.ENODEV})
"""What asking a TAP descriptor its name gives once the device was deleted."""


class AgentError(Exception):
    """The agent cannot run at all; the message says what to do."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """How the agent reaches its parent; the CLI builds it from the command line."""

    endpoint: Endpoint
    """Where the parent listens (``vsock://3:1024`` in an enclave, ``unix://`` in tests)."""
    protocol: LinkProtocol = LinkProtocol.GVPROXY
    """The link framing."""
    mtu: int = DEFAULT_MTU
    """The TAP's MTU (``--mtu``), for links to a parent that states none; a parent that
    states its MTU in its reply (our daemon) gets that one instead (`Agent.mtu`)."""
    connect_timeout: float = 5.0
    """Seconds a connect may take."""
    reply_wait: float = 0.25
    """Seconds to wait for our daemon's reply before taking the peer for a stock gvproxy."""
    handshake_timeout: float = 5.0
    """Seconds to finish reading a reply once it has started."""
    offload: bool = True
    """Ask the parent for checksum offload when the TAP can do it (``--no-offload``: never)."""
    tso: bool = True
    """With `offload`, ask for TCP segmentation offload too when the TAP can do it
    (``--no-tso``: never)."""
    stable_after: float = 1.0
    """Seconds a link must stay up for the backoff to start again from its first delay."""
    backoff: Callable[[], Backoff] = field(default=Backoff)
    """Makes the backoff schedule (0.05 s doubling to 2 s by default)."""


@dataclass(frozen=True, slots=True)
class SessionOutcome:
    """How one link session ended."""

    reason: str
    up_seconds: float | None = None
    """How long the link was up; None if it never came up."""


class _StopRequested(Exception):
    """The agent was asked to stop during a session."""


class Agent:
    """Keep a link to the parent up, pumping frames between it and the TAP."""

    def __init__(
        self,
        config: AgentConfig,
        tap_fd: int,
        *,
        on_link_up: Callable[[HandshakeResult], None] | None = None,
        link_up_fds: Sequence[int] = (),
        vnet_hdr: bool = False,
        set_offload: Callable[[int, int], None] = tap_set_offload,
        set_mtu: Callable[[int, int], None] = tap_set_mtu,
    ) -> None:
        """Args:
        config: where and how to connect.
        tap_fd: the TAP (or, in tests, any boundary-keeping descriptor); not closed here.
        on_link_up: called in the agent's process each time the link comes up.
        link_up_fds: descriptors (e.g. pipes) that each get one byte each time the link
            comes up, for a parent process or a supervisor; written without blocking (a
            reader that does not keep up misses bytes, never stalls the agent).
        vnet_hdr: the TAP's frames carry virtio-net headers (opened with ``IFF_VNET_HDR``);
            checksum offload needs them.
        set_offload: sets the TAP's offloads (``TUNSETOFFLOAD``; replaceable in tests).
        set_mtu: sets the TAP's MTU (``SIOCSIFMTU``; replaceable in tests).
        """
        self.config = config
        self.tap_fd = tap_fd
        self.on_link_up = on_link_up
        self.link_up_fds = tuple(link_up_fds)
        self.vnet_hdr = vnet_hdr
        self.sessions = 0
        """Sessions whose link came up."""
        self.offload: bool | None = None
        """Whether checksum offload is on for the current (or last) link; None before one."""
        self.mtu = config.mtu
        """The TAP's MTU now: `AgentConfig.mtu` (set up before the agent starts) until a
        parent states another (`_fit_mtu`)."""
        self._set_offload = set_offload
        self._set_mtu = set_mtu
        self._mtus_told: set[str] = set()
        """MTU messages the operator was told (each once; `_tell_mtu`)."""
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._last_failure = ""
        self._quiet = False
        self._offload_settable = False
        """TUNSETOFFLOAD works on this TAP: set it for every session."""
        self._tso_settable = False
        """The TAP takes `TUN_F_TSO4` too."""
        self._no_offload_reason: str | None = None
        """Why the agent does not ask for offload; None while it asks."""
        self._probe_offload()

    @property
    def asks_for_offload(self) -> bool:
        """True if the agent asks gvproxy-framed parents for checksum offload."""
        return self._no_offload_reason is None

    @property
    def asks_for_tso(self) -> bool:
        """True if the agent asks for TCP segmentation offload along with checksum offload."""
        return self.asks_for_offload and self._tso_settable and self.config.tso

    def stop(self) -> None:
        """Ask the agent to stop; safe from a signal handler or another thread."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._stop_w, b"x")

    @property
    def stopping(self) -> bool:
        """True once `stop` was called."""
        return bool(select.select([self._stop_r], [], [], 0)[0])

    def close(self) -> None:
        """Release the stop pipe (the TAP belongs to the caller)."""
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def run_forever(self) -> None:
        """Run sessions until `stop`, waiting with backoff between them.

        Raises:
            AgentError: the endpoint can never work (e.g. no vsock in this kernel).
        """
        backoff = self.config.backoff()
        while not self.stopping:
            outcome = self.run_session()
            if self.stopping:
                break
            if outcome.up_seconds is not None and outcome.up_seconds >= self.config.stable_after:
                backoff.reset()
            delay = backoff.next_delay()
            self._log_progress(f"retry in {delay:.2f} s")
            if self._wait_stop(delay):
                break
        logger.info("stopped")

    def run_session(self) -> SessionOutcome:
        """Connect, handshake and pump once; return why the session ended.

        Raises:
            AgentError: a connect error no retry can fix.
        """
        endpoint = self.config.endpoint
        self._log_progress(f"connecting to {endpoint} ({self.config.protocol.value} framing)")
        try:
            sock = connect(endpoint, timeout=self.config.connect_timeout)
        except OSError as exc:
            return self._connect_failed(exc)
        try:
            return self._run_link(sock)
        finally:
            sock.close()

    def _connect_failed(self, exc: OSError) -> SessionOutcome:
        endpoint = self.config.endpoint
        if exc.errno in _FATAL_CONNECT_ERRNOS:
            raise AgentError(
                f"cannot open {endpoint}: {exc.strerror}; vsock works only inside an "
                "enclave (use --parent unix:///PATH elsewhere)"
            ) from exc
        reason = f"cannot connect to {endpoint}: {exc.strerror or exc}"
        self._log_failure(reason)
        return SessionOutcome(reason)

    def _run_link(self, sock: socket.socket) -> SessionOutcome:
        try:
            result = self._handshake(sock)
        except _StopRequested:
            return SessionOutcome("agent stopping")
        except (LinkError, OSError) as exc:
            reason = f"handshake failed: {_describe(exc)}"
            self._log_failure(reason)
            return SessionOutcome(reason)
        problem = self._apply_offload(result.offload, tso=result.tso)
        if problem is not None:
            self._log_failure(problem)
            return SessionOutcome(problem)
        link_mtu = self._fit_mtu(result)
        self._announce_link_up(result)
        up_at = time.monotonic()
        try:
            pumped = run_pump(
                self.tap_fd,
                sock,
                self.config.protocol,
                initial=result.initial,
                stop_fd=self._stop_r,
                max_frame=link_mtu + ETHERNET_HEADER,
                vnet_hdr=self.vnet_hdr,
                csum_offload=result.offload,
                gso_size=link_mtu - TCP_IPV4_HEADERS if result.tso else 0,
                reply_overdue=result.reply_overdue,
            )
        except OSError as exc:  # fork or pipe failed (EAGAIN, ENOMEM): retry later
            reason = f"cannot start the frame pump: {exc.strerror or exc}"
            self._log_failure(reason)
            return SessionOutcome(reason)
        up_seconds = time.monotonic() - up_at
        if self.stopping:
            logger.info("link closed: agent stopping")
        else:
            logger.warning("link lost: %s", pumped.reason)
        logger.debug("tap→link %s; link→tap %s", pumped.tap_to_link.stats, pumped.link_to_tap.stats)
        self._check_tap()
        return SessionOutcome(pumped.reason, up_seconds)

    def _check_tap(self) -> None:
        """Raise `AgentError` if the TAP is gone (``ip link del tap0``): no session could
        ever work again, and each would look like a link that came up and failed.

        Raises:
            AgentError: the TAP no longer works.
        """
        try:
            tap_name(self.tap_fd)
        except OSError as exc:
            if exc.errno not in _TAP_GONE_ERRNOS:
                return  # not a TAP at all (a socket standing in for one in tests)
            raise AgentError(
                f"the TAP device is gone ({exc.strerror or exc}): was it deleted? restart"
                " the agent to create it again"
            ) from exc

    def _handshake(self, sock: socket.socket) -> HandshakeResult:
        """Send the request and decide the peer's kind (see `Handshake`).

        Raises:
            LinkError: a bad reply, a refusal, or no complete reply in time.
            OSError: the link failed.
            _StopRequested: `stop` was called meanwhile.
        """
        handshake = Handshake(
            self.config.protocol, offload=self.asks_for_offload, tso=self.asks_for_tso
        )
        sock.sendall(handshake.request())
        deadline = time.monotonic() + self.config.reply_wait
        expired = False
        while handshake.result is None:
            if not self._wait_readable(sock, deadline - time.monotonic()):
                if expired:
                    raise LinkError("the parent's reply did not complete in time")
                expired = True
                deadline = time.monotonic() + self.config.handshake_timeout
                handshake.wait_expired()
                continue
            data = sock.recv(65536)
            if not data:
                raise LinkError("the parent closed the link during the handshake")
            handshake.receive_data(data)
        return handshake.result

    def _probe_offload(self) -> None:
        """Decide once whether to ask for checksum offload: the TAP must take TUNSETOFFLOAD.

        Sets `TUN_F_CSUM` and then 0 again (with ``--no-offload`` only 0); a failure is
        logged once, as a warning, and the agent then never asks. Segmentation offload is
        asked for only if the TAP takes `TUN_F_TSO4` as well.
        """
        if not self.vnet_hdr:
            self._no_offload_reason = "the TAP has no virtio-net headers"
            return
        try:
            if self.config.offload:
                self._set_offload(self.tap_fd, TUN_F_CSUM)
                if self.config.tso:
                    self._tso_settable = self._try_offload(TUN_F_CSUM | TUN_F_TSO4)
            self._set_offload(self.tap_fd, 0)
        except OSError as exc:
            logger.warning(
                "cannot set the TAP's offloads (TUNSETOFFLOAD: %s): no checksum offload",
                _describe(exc),
            )
            self._no_offload_reason = "the TAP cannot do it (TUNSETOFFLOAD failed)"
            return
        self._offload_settable = True
        if not self.config.offload:
            self._no_offload_reason = "not asked for (--no-offload)"

    def _try_offload(self, flags: int) -> bool:
        """Return True if the TAP takes these offload flags."""
        try:
            self._set_offload(self.tap_fd, flags)
        except OSError as exc:
            logger.debug("the TAP does not take offloads %#x: %s", flags, _describe(exc))
            return False
        return True

    def _apply_offload(self, on: bool, *, tso: bool = False) -> str | None:
        """Set the TAP's offloads for a new session; return why the session cannot go on.

        Only failing to turn offload on ends the session: the parent has agreed to leave
        the checksums of enclave-bound TCP segments partial (and, with `tso`, to send
        super-segments). The agent then stops asking for what failed (segmentation offload
        alone when only that failed), so the next session runs without it. Failing to turn
        offload off is logged; the session goes on (nothing better can be done).
        """
        self.offload = on
        if not self._offload_settable:
            return None
        try:
            flags = (TUN_F_CSUM | (TUN_F_TSO4 if tso else 0)) if on else 0
            self._set_offload(self.tap_fd, flags)
        except OSError as exc:
            if on and tso:
                self._tso_settable = False
                self.offload = False
                return (
                    f"cannot turn the TAP's segmentation offload on (TUNSETOFFLOAD: "
                    f"{_describe(exc)}): reconnecting without it"
                )
            self._offload_settable = False
            self._no_offload_reason = "the TAP cannot do it (TUNSETOFFLOAD failed)"
            if on:
                self.offload = False
                return (
                    f"cannot turn the TAP's checksum offload on (TUNSETOFFLOAD: "
                    f"{_describe(exc)}): reconnecting without it"
                )
            logger.warning(
                "cannot turn the TAP's checksum offload off (TUNSETOFFLOAD: %s): frames "
                "to the parent may carry partial checksums",
                _describe(exc),
            )
        return None

    def _fit_mtu(self, result: HandshakeResult) -> int:
        """Give the TAP the link's MTU for this session and return it.

        The link's MTU is the one the parent states in its reply (our daemon's ``--mtu``),
        or ours (``--mtu``) for a parent that states none (a stock gvproxy, the qemu
        framing) or an unusable one. A frame larger than the daemon's MTU would make it
        close the link, and the agent reconnect, for ever. If the TAP refuses the MTU, the
        pump still reads at most the link's MTU from it: a larger frame is dropped there
        and counted, and the link stays up. A stated MTU that differs from ours, an
        unusable one, or a refusal is logged once per distinct message (`_tell_mtu`),
        saying what the TAP really uses.
        """
        try:
            stated = stated_mtu(result.reply)
            unusable = None
        except LinkError as exc:
            stated, unusable = None, str(exc)
        link_mtu = self.config.mtu if stated is None else stated
        failure = self._change_tap_mtu(link_mtu)
        if unusable is not None:
            self._tell_mtu(f"{unusable}: the TAP uses ours, {self.mtu}{failure}")
        elif stated is not None and stated != self.config.mtu:
            self._tell_mtu(
                f"the parent's MTU is {stated} and ours (--mtu) {self.config.mtu}: the TAP "
                f"uses {self.mtu} on links to it{failure}"
            )
        elif failure:  # back to ours, refused
            self._tell_mtu(
                f"the link's MTU is {link_mtu}, the TAP's {self.mtu}{failure}",
                harmless=self.mtu < link_mtu,
            )
        return link_mtu

    def _change_tap_mtu(self, mtu: int) -> str:
        """Set the TAP's MTU if it differs; return "" or, if the TAP refused, why (for the
        operator's log)."""
        if mtu == self.mtu:
            return ""
        try:
            self._set_mtu(self.tap_fd, mtu)
        except OSError as exc:
            logger.debug("cannot set the TAP's MTU to %d: %s", mtu, _describe(exc))
            effect = "larger frames from the enclave are dropped" if mtu < self.mtu else "no harm"
            return f" (it refused {mtu}: {_describe(exc)}; {effect})"
        logger.info("TAP mtu %d (was %d)", mtu, self.mtu)
        self.mtu = mtu
        return ""

    def _tell_mtu(self, message: str, *, harmless: bool = False) -> None:
        """Warn about a link's MTU (log a `harmless` case) once per distinct message (a
        parent's MTU, and whether the TAP took it); debug after."""
        if message in self._mtus_told:
            level = logging.DEBUG
        else:
            level = logging.INFO if harmless else logging.WARNING
        self._mtus_told.add(message)
        logger.log(level, "%s", message)

    def _describe_offload(self, result: HandshakeResult) -> str:
        """Return the session's log line about checksum offload."""
        if result.offload:
            if result.tso:
                return "checksum offload on, segmentation offload on"
            return "checksum offload on, segmentation offload off"
        if self._no_offload_reason is not None:
            why = self._no_offload_reason
        elif result.peer is PeerKind.QEMU:
            why = "qemu framing"
        elif result.peer is PeerKind.GVPROXY:
            why = "the peer did not reply (stock gvproxy)"
        else:
            why = "the parent did not agree"
        return f"checksum offload off: {why}"

    def _wait_readable(self, sock: socket.socket, timeout: float) -> bool:
        """Wait for `sock` to be readable; False on timeout.

        Raises:
            _StopRequested: `stop` was called.
        """
        ready, _, _ = select.select([sock.fileno(), self._stop_r], [], [], max(0.0, timeout))
        if self._stop_r in ready:
            raise _StopRequested
        return bool(ready)

    def _wait_stop(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds; True if `stop` was called."""
        return bool(select.select([self._stop_r], [], [], timeout)[0])

    def _announce_link_up(self, result: HandshakeResult) -> None:
        self.sessions += 1
        self._last_failure, self._quiet = "", False
        logger.info("link up: %s at %s", result.describe(), self.config.endpoint)
        logger.info("%s", self._describe_offload(result))
        if result.reply is not None:
            logger.debug("parent's reply headers: %s", dict(result.reply.headers))
        if self.on_link_up is not None:
            self.on_link_up(result)
        for fd in self.link_up_fds:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(fd, b"U")

    def _log_failure(self, message: str) -> None:
        """Log a failure: a warning, or debug when it repeats the previous failure."""
        self._quiet = message == self._last_failure
        self._last_failure = message
        logger.log(logging.DEBUG if self._quiet else logging.WARNING, "%s", message)

    def _log_progress(self, message: str) -> None:
        """Log a step: info, or debug while the same failure keeps repeating."""
        logger.log(logging.DEBUG if self._quiet else logging.INFO, "%s", message)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)

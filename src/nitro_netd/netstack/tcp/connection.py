"""One TCP flow between the enclave's kernel and a host socket.

Theory of operation
-------------------
This is a translator, not a TCP stack (the approach of passt). The host kernel does real
TCP with the world on a host socket; here we only speak TCP to the enclave's kernel over a
link that is ordered and almost lossless (frames towards the enclave can be dropped when
its TAP queue overflows). Per flow we track:

* the enclave's sending side: `rcv_nxt` (next byte we expect) and the right edge of the
  window we advertised. Bytes at `rcv_nxt` are collected and, at the end of the batch
  (`flush_ack`), handed to the host as one `TcpSend` and acknowledged once; when only a
  small segment or a FIN came in, the ACK waits up to `ACK_DELAY` so a reply (or our own
  FIN, as the host side closes in turn) can carry it (a delayed ACK; duplicates, probes
  and window updates are answered at once).
  The window is `tcp_buffer` bytes;
  when the shell says its host socket is backed up (`TcpWriteBlocked`) the right edge
  stops moving, so the advertised window shrinks to zero as bytes arrive — a slow world
  slows the enclave and nothing is dropped. Bytes beyond `rcv_nxt` (a gap) are dropped and
  answered with a duplicate ACK; bytes before it (a retransmit) are trimmed.
* our sending side: the bytes the host gave us (`TcpData`) wait in `send_buffer`, which
  starts at `snd_una`, until the enclave acknowledges them. Segments of at most the
  enclave's MSS are sent within its (scaled) window. Loss is repaired by go-back-N on a
  retransmission timeout and by a fast retransmit after three duplicate ACKs. While the
  enclave's window is zero the timer probes it instead (never counted as a retransmission:
  a slow reader is not a dead one; `probes` bounds a silent or orphaned flow), and a
  reopening window restarts the timer and sends again what the zero window may have
  dropped. When the
  buffer holds more than `tcp_buffer` bytes the shell is told to stop reading the host
  socket (`TcpPauseReading`) until the enclave catches up.
* closing: an enclave FIN becomes `TcpShutdown` (SHUT_WR after queued bytes); a host EOF
  becomes our FIN once everything before it was sent and the window has room for it. When
  both FINs are acknowledged the
  host socket is closed and the flow forgotten (no TIME-WAIT on our side). RST maps to RST
  both ways, but a host socket that fails while bytes it gave us are still queued first
  delivers them (and its FIN, if it had sent one), as a direct path would, and resets the
  enclave once they are acknowledged (`host_failed`; the enclave's bytes after the failure
  are dropped unacknowledged). A failed connect becomes RST (refused) or ICMP unreachable
  (no route, timeout).

Everything is driven by method calls with `now`; output goes to the shared `StackOutput`.
"""

from __future__ import annotations

import enum
import errno as errnos
import logging
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.errors import DropReason
from nitro_netd.frames.icmp import IcmpMessage, IcmpType, UnreachableCode, build_icmp
from nitro_netd.frames.ipv4 import IpProto, build_ipv4_header
from nitro_netd.frames.tcp import TcpFlags, TcpHeader, TcpOptions
from nitro_netd.netstack.events import (
    FlowId,
    TcpClose,
    TcpConnect,
    TcpPauseReading,
    TcpRelease,
    TcpResumeReading,
    TcpSend,
    TcpShutdown,
)
from nitro_netd.netstack.flowlog import FlowLogger
from nitro_netd.netstack.output import StackOutput
from nitro_netd.netstack.spans import HostSpan
from nitro_netd.netstack.tcp.segments import SegmentBuilder
from nitro_netd.netstack.tcp.sendqueue import Payload, SendQueue
from nitro_netd.netstack.tcp.seq import seq_add, seq_diff, seq_le, seq_lt

logger = logging.getLogger("nitro_netd.netstack.tcp")

INITIAL_RTO: Final = 0.2
MAX_RTO: Final = 10.0
MAX_RETRIES: Final = 12
"""Retransmissions of the same data before the flow is declared dead and reset."""
DUPACK_THRESHOLD: Final = 3
ACK_DELAY: Final = 0.0005
"""How long the ACK for a small segment may wait for a reply to ride on (delayed ACK)."""
DEFAULT_MSS: Final = 536
"""RFC 9293 §3.7.1: the MSS to assume when the SYN carries none."""
_UNREACHABLE_CODES: Final = {
    errnos.ENETUNREACH: UnreachableCode.NET,
    errnos.EHOSTUNREACH: UnreachableCode.HOST,
    errnos.ETIMEDOUT: UnreachableCode.HOST,
    errnos.EHOSTDOWN: UnreachableCode.HOST,
}
# Plain ints on the data path: IntFlag arithmetic costs a Python call per operation.
_FIN: Final = int(TcpFlags.FIN)
_SYN: Final = int(TcpFlags.SYN)
_RST: Final = int(TcpFlags.RST)
_PSH: Final = int(TcpFlags.PSH)
_ACK: Final = int(TcpFlags.ACK)


class TcpState(enum.Enum):
    """Where a flow is in its life."""

    CONNECTING = "connecting"
    """The enclave's SYN was seen; the host connect is in flight."""
    SYN_SENT = "syn_sent"
    """Inbound: our SYN went to the enclave; waiting for its SYN-ACK."""
    ESTABLISHED = "established"
    """SYN-ACK sent; data flows (half-closes are tracked by flags)."""
    CLOSED = "closed"
    """Finished or reset; the layer forgets it."""


def window_scale_for(buffer: int) -> int:
    """The smallest shift that lets a 16-bit window field express `buffer` bytes."""
    shift = 0
    while buffer >> shift > 0xFFFF and shift < 14:
        shift += 1
    return shift


class TcpConnection:
    """The state of one flow. See the module docstring for the theory of operation."""

    def __init__(
        self,
        flow: FlowId,
        output: StackOutput,
        builder: SegmentBuilder,
        syn: TcpHeader | None,
        *,
        iss: int,
        buffer: int,
        mss: int,
        on_timer_change: Callable[[TcpConnection], None],
    ) -> None:
        """Create a flow; `syn` is the enclave's SYN (None when we open it: see inbound.py)."""
        self.flow = flow
        self.output = output
        self.builder = builder
        self.state = TcpState.CONNECTING
        self.log = FlowLogger(logger, self._describe)
        self._on_timer_change = on_timer_change
        self.buffer = buffer
        self.our_mss = mss
        # Receive side (enclave -> host); set from the enclave's SYN or SYN-ACK.
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_right_edge = 0
        self.write_blocked = False
        self.enclave_fin = False
        self.ack_pending = False
        self._ack_now = False
        """The owed ACK may not wait (a duplicate, a FIN, a window update, a probe...)."""
        self._received_unacked = 0
        self._now = 0.0
        self._to_host: list[bytes | memoryview] = []
        """Bytes from the enclave not yet handed to the host: one `TcpSend` per batch."""
        # Send side (host -> enclave).
        self.scaling = False
        self.enclave_ws = 0
        self.our_ws = 0
        self.enclave_mss = DEFAULT_MSS
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss
        self.snd_wnd = 0
        self.syn_acked = False
        self.send_buffer = SendQueue()
        self.host_eof = False
        self.fin_acked = False
        self.host_failed = False
        """The host socket failed while bytes it gave us were still queued: they (and the
        FIN, after a host EOF) are delivered first, then RST ends the flow."""
        self.probes = 0
        """Zero-window probes without an ACK since (and, once `host_failed`, at all)."""
        self.reading_paused = False
        self.dupacks = 0
        self.rto = INITIAL_RTO
        self.retries = 0
        self.rto_deadline: float | None = None
        self.ack_deadline: float | None = None
        self.deadline: float | None = None
        """The earlier of the two: what the layer's timer heap follows."""
        self.syn_quote = b""
        """The first 8 bytes of the enclave's SYN, quoted in ICMP errors."""
        if syn is not None:
            self.learn_peer(syn)

    def learn_peer(self, syn: TcpHeader) -> None:
        """Take the enclave's ISN, MSS, window and window scale from its SYN (or SYN-ACK)."""
        self.irs = syn.seq
        self.rcv_nxt = seq_add(syn.seq, 1)
        self.rcv_right_edge = seq_add(self.rcv_nxt, self.buffer)
        ws = syn.options.window_scale
        self.scaling = ws is not None
        self.enclave_ws = ws or 0
        self.our_ws = window_scale_for(self.buffer) if self.scaling else 0
        self.enclave_mss = min(syn.options.mss or DEFAULT_MSS, self.our_mss)
        self.snd_wnd = syn.window

    def _describe(self) -> str:
        b = self.builder
        return f"tcp {self.output.config.enclave_ip}:{b.destination_port}→{IPv4Address(b._src)}:{b.source_port}"

    def describe(self) -> str:
        """One line of this flow's state, for operators (SIGUSR1) and debugging."""
        return (
            f"{self.state.value} rcv_nxt={self.rcv_nxt} edge={seq_diff(self.rcv_right_edge, self.rcv_nxt)}"
            f" blocked={self.write_blocked} enclave_fin={self.enclave_fin} una={self.snd_una}"
            f" nxt+{seq_diff(self.snd_nxt, self.snd_una)} max+{seq_diff(self.snd_max, self.snd_una)}"
            f" wnd={self.snd_wnd} queued={self.send_buffer.size} host_eof={self.host_eof}"
            f" fin_acked={self.fin_acked} paused={self.reading_paused} rto={self.rto}"
            f" rto_at={self.rto_deadline} ack_at={self.ack_deadline} retries={self.retries} dupacks={self.dupacks}"
        )

    @property
    def closed(self) -> bool:
        """True once the flow is finished or reset."""
        return self.state is TcpState.CLOSED

    # --- commands out --------------------------------------------------------------

    def connect_command(self, address: IPv4Address, port: int, timeout: float) -> TcpConnect:
        """The command that opens the host side."""
        return TcpConnect(self.flow, address, port, timeout)

    # --- events from the host ---------------------------------------------------------

    def on_host_connected(self, now: float) -> None:
        """The host socket connected: answer the enclave's SYN."""
        if self.state is not TcpState.CONNECTING:
            return
        self.state = TcpState.ESTABLISHED
        self.log.debug("connected")
        self._send_syn_ack()
        self.snd_nxt = self.snd_max = seq_add(self.iss, 1)
        self._arm(now)

    def on_host_failed(self, error: int, now: float, *, data_lost: bool = False) -> None:
        """The host socket failed: tell the enclave with RST or ICMP, and finish (once the
        bytes the host gave are delivered, unless the shell lost them: `data_lost`)."""
        if self.state is TcpState.CONNECTING:
            self.log.info("connect failed: %s", errnos.errorcode.get(error, error))
            self._refuse(error)
        elif self.state in (TcpState.ESTABLISHED, TcpState.SYN_SENT):
            name = errnos.errorcode.get(error, error)
            held = self.send_buffer.size and not data_lost
            if self.state is TcpState.ESTABLISHED and held and self.syn_acked:
                # The world sent these bytes before it failed: deliver them, as a direct
                # path would, and reset once they are acknowledged (_end_after_host_failure).
                self.log.info(
                    "host reset: %s; delivering %d bytes first", name, self.send_buffer.size
                )
                self.host_failed = True
                return
            self.log.info("host reset: %s", name)
            self._send(self.snd_nxt, _RST | _ACK)
        self._finish(reset=False)

    def on_host_data(self, data: bytes | HostSpan, now: float) -> None:
        """Bytes from the host: queue them and send what the enclave's window allows."""
        if self.state is TcpState.CLOSED or self.host_eof:
            return
        self.send_buffer.append(data)
        if self.send_buffer.size > self.buffer and not self.reading_paused:
            self.reading_paused = True
            self.output.send_command(TcpPauseReading(self.flow))
        self._try_send(now)

    def on_host_eof(self, now: float) -> None:
        """The host half-closed: our FIN follows the queued bytes."""
        if self.state is TcpState.CLOSED or self.host_eof:
            return
        self.host_eof = True
        self._try_send(now)

    def on_write_blocked(self, blocked: bool) -> None:
        """The shell's buffer for this flow filled (or drained): freeze (or free) the window."""
        self.write_blocked = blocked
        if not blocked:
            self._owe_ack(now_please=True)

    # --- segments from the enclave ---------------------------------------------------

    def on_segment(self, header: TcpHeader, payload: memoryview, now: float) -> None:
        """Process one parsed segment of this flow from the enclave."""
        flags = int(header.flags)
        if flags & _RST:
            self._on_rst(header.seq)
        elif flags & _SYN:
            self._on_repeated_syn(header)
        else:
            self.on_fields(header.seq, header.ack, flags, header.window, payload, now)

    def on_fields(
        self, seq: int, ack: int, flags: int, window: int, payload: memoryview, now: float
    ) -> None:
        """Process a segment without SYN or RST, given by its fields (the fast path)."""
        self._now = now
        if self.state is not TcpState.ESTABLISHED or not flags & _ACK:
            return
        if not self._on_ack(ack, window, flags, payload, now) or self.closed:
            return
        if self.host_failed:
            self._end_after_host_failure(payload, flags)
        elif payload or flags & _FIN:
            self._on_data(seq, payload, bool(flags & _FIN))
        elif seq != self.rcv_nxt:
            self._owe_ack(now_please=True)  # e.g. a zero-window probe (RFC 9293 §3.10.7.4)
        self._maybe_done()

    def _end_after_host_failure(self, payload: memoryview, flags: int) -> None:
        """The host is gone: the enclave's new bytes have nowhere to go (dropped, never
        acknowledged); once ours are acknowledged, RST ends the flow."""
        if payload or flags & _FIN:
            self.output.stats.count_drop(DropReason.HOST_FAILED)
        if not self.send_buffer.size and (self.fin_acked or not self.host_eof):
            self._send(self.snd_nxt, _RST | _ACK)
            self._finish(reset=False)

    def _on_repeated_syn(self, header: TcpHeader) -> None:
        """A SYN on a known flow: a retransmit (answer it again) or a new connection."""
        if header.seq != self.irs:
            self.log.info("new SYN on a live flow: resetting it")
            self._send(self.snd_nxt, _RST | _ACK)
            self._finish(reset=True)
        elif self.state is TcpState.ESTABLISHED and not self.syn_acked:
            self._send_syn_ack()  # our SYN-ACK was lost
        elif self.syn_acked:
            self._owe_ack(now_please=True)  # our ACK of its SYN-ACK was lost

    def _on_rst(self, seq: int) -> None:
        offset = seq_diff(seq, self.rcv_nxt)
        if 0 <= offset <= max(self.buffer, 1) or self.state is TcpState.CONNECTING:
            self.log.info("reset by enclave")
            self._flush_to_host()  # bytes that came in order before the RST still go out
            self._finish(reset=True)

    def _on_ack(self, ack: int, window: int, flags: int, payload: memoryview, now: float) -> bool:
        """Process the ACK field; False when the whole segment must be dropped."""
        if not self.syn_acked:
            if ack != seq_add(self.iss, 1):
                return False  # does not complete our handshake (RFC 9293 §3.10.7.4)
            self.syn_acked = True
            self.snd_una = ack
            self.rto, self.retries, self.rto_deadline = INITIAL_RTO, 0, None
        elif not seq_le(ack, self.snd_max):
            self._owe_ack(now_please=True)  # acknowledges what we never sent: ACK and drop
            return False
        acked = seq_diff(ack, self.snd_una)
        window <<= self.enclave_ws
        if acked > 0:
            self._advance(ack, acked, now)
        elif (
            acked == 0
            and not payload
            and window == self.snd_wnd
            and self.snd_una != self.snd_max
            and not flags & _FIN
        ):
            self._on_dupack(now)
        reopened = False
        if not self.host_failed:
            self.probes = 0  # an answer: the enclave is alive (an orphan's probes still count)
        if acked >= 0:  # an older ACK carries an older window: ignore it
            reopened = window > 0 and not self.snd_wnd
            if reopened:
                self.rto = INITIAL_RTO  # probing is over: what it held back gets a fresh timer
                self.snd_nxt = self.snd_una  # and what the zero window dropped goes again
            self.snd_wnd = window
        # New data acknowledged, or a zero window reopened: restart the timer.
        self._try_send(now, restart=acked > 0 or reopened)
        return True

    def _advance(self, ack: int, acked: int, now: float) -> None:
        queue = self.send_buffer
        data = min(acked, queue.size)
        spans = queue.spans
        queue.consume(data)
        if spans and not queue.spans:  # the shell may let go of what it kept
            self.output.send_command(TcpRelease(self.flow, queue.base))
        if acked > data and self.host_eof:
            self.fin_acked = True
        self.snd_una = ack
        if seq_lt(self.snd_nxt, ack):
            self.snd_nxt = ack
        self.dupacks = 0
        self.retries = 0
        self.rto = INITIAL_RTO  # the caller's _try_send restarts the timer with it
        if self.reading_paused and self.send_buffer.size <= self.buffer // 2:
            self.reading_paused = False
            self.output.send_command(TcpResumeReading(self.flow))

    def _on_dupack(self, now: float) -> None:
        self.dupacks += 1
        if self.dupacks == DUPACK_THRESHOLD:
            self.log.debug("fast retransmit at %d", self.snd_una)
            self.output.stats.tcp["fast_retransmits"] += 1
            self._retransmit_first()

    def _on_data(self, seq: int, payload: memoryview, fin: bool) -> None:
        if self.enclave_fin:
            self._owe_ack(now_please=True)
            return
        offset = seq_diff(self.rcv_nxt, seq)
        if offset < 0:
            self.output.stats.count_drop(DropReason.OUT_OF_ORDER)
            self._send_ack()  # a gap: ask again for rcv_nxt
            return
        new = payload[offset:] if offset < len(payload) else payload[:0]
        # A new FIN's ACK may wait like a small segment's: the host side's close usually
        # follows within `ACK_DELAY`, and our FIN then carries it (a frame fewer per
        # connection). Only a segment with nothing new (a duplicate) is answered at once.
        self._owe_ack(now_please=not new and not fin)
        room = seq_diff(self._right_edge(), self.rcv_nxt)
        if len(new) > room:
            self.output.stats.count_drop(DropReason.OUT_OF_WINDOW)
            new, fin = new[: max(room, 0)], False
        if new:
            self._to_host.append(new)  # a view: see TcpSend
            self.rcv_nxt = seq_add(self.rcv_nxt, len(new))
            self._received_unacked += len(new)
        if fin and seq_add(seq, len(payload)) == self.rcv_nxt:
            self.rcv_nxt = seq_add(self.rcv_nxt, 1)
            self.enclave_fin = True
            self.log.debug("enclave FIN")
            self._flush_to_host()
            self.output.send_command(TcpShutdown(self.flow))

    # --- sending -------------------------------------------------------------------

    def _right_edge(self) -> int:
        if not self.write_blocked:
            edge = seq_add(self.rcv_nxt, self.buffer)
            if seq_lt(self.rcv_right_edge, edge):
                self.rcv_right_edge = edge
        return self.rcv_right_edge

    def _window_field(self) -> int:
        window = max(seq_diff(self._right_edge(), self.rcv_nxt), 0) >> self.our_ws
        return min(window, 0xFFFF)

    def _send(self, seq: int, flags: int, payload: Payload = b"") -> None:
        frame = self.builder.build(seq, self.rcv_nxt, flags, self._window_field(), payload)
        self.output.send_frame(frame)
        if flags & _ACK:
            self.ack_pending = self._ack_now = False
            self._received_unacked = 0
            if self.ack_deadline is not None:
                self.ack_deadline = None
                self._set_deadline()

    def _send_ack(self) -> None:
        self._send(self.snd_nxt, _ACK)

    def _send_syn_ack(self) -> None:
        options = TcpOptions(mss=self.our_mss, window_scale=self.our_ws if self.scaling else None)
        window = min(self.buffer, 0xFFFF)
        frame = self.builder.build(self.iss, self.rcv_nxt, _SYN | _ACK, window, options=options)
        self.output.send_frame(frame)

    def _flush_to_host(self) -> None:
        if self._to_host:
            chunks, self._to_host = self._to_host, []
            self.output.send_command(TcpSend(self.flow, tuple(chunks)))

    def _owe_ack(self, *, now_please: bool) -> None:
        self.ack_pending = True
        self._ack_now = self._ack_now or now_please

    def flush_ack(self) -> None:
        """End of a batch: hand the enclave's bytes to the host, and send the ACK owed —
        unless only a small segment came in: then the ACK waits up to `ACK_DELAY` for a
        reply to ride on (saving a frame per request in request/response traffic)."""
        self._flush_to_host()
        if not self.ack_pending or self.state is not TcpState.ESTABLISHED or not self.syn_acked:
            return
        if self._ack_now or self._received_unacked >= self.enclave_mss:
            self._send_ack()
        elif self.ack_deadline is None:
            self.ack_deadline = self._now + ACK_DELAY
            self._set_deadline()

    def _try_send(self, now: float, *, restart: bool = False) -> None:
        """Send what the window allows, then keep the timer running (`_arm`; `restart`
        when new data was just acknowledged). Runs on every segment and host read, so
        `offset` (bytes sent but not acknowledged) is computed once and carried along."""
        if self.state is not TcpState.ESTABLISHED or not self.syn_acked:
            if restart:
                self._arm(now, restart=True)
            return
        queue = self.send_buffer
        buffered = queue.size
        offset = seq_diff(self.snd_nxt, self.snd_una)
        if offset < buffered:
            segment = self.output.segment_size(self.enclave_mss)
            window = self.snd_wnd
            while (n := min(segment, buffered - offset, window - offset)) > 0:
                payload = queue.slice(offset, n)
                n = len(payload)  # shorter where bytes from the host meet spans
                last = offset + n == buffered
                flags = _ACK | _PSH if last else _ACK
                if last and self.host_eof:
                    flags |= _FIN
                    n_seq = n + 1
                else:
                    n_seq = n
                self._send(self.snd_nxt, flags, payload)
                self._sent(seq_add(self.snd_nxt, n_seq))
                offset += n_seq
        if self.host_eof and offset == buffered and not self.fin_acked and offset < self.snd_wnd:
            # Never into a zero window (as Linux): a receiver drops it, and each resend
            # would count as a retransmission of a live peer. `_window_blocked` probes.
            self._send(self.snd_nxt, _FIN | _ACK)
            self._sent(seq_add(self.snd_nxt, 1))
        self._arm(now, restart=restart)

    def _sent(self, new_nxt: int) -> None:
        self.snd_nxt = new_nxt
        if seq_lt(self.snd_max, new_nxt):
            self.snd_max = new_nxt

    def _retransmit_first(self) -> None:
        """Re-send the oldest unacknowledged segment (or FIN): never past what was sent
        (`snd_max`), which a super-segment would otherwise overshoot under a small window."""
        in_flight = max(seq_diff(self.snd_max, self.snd_una), 0)
        n = min(self.output.segment_size(self.enclave_mss), self.send_buffer.size, in_flight)
        if n:
            payload = self.send_buffer.slice(0, n)
            n = len(payload)
            last = n == self.send_buffer.size and self.host_eof and in_flight > n
            flags = _ACK | _PSH | (_FIN if last else 0)
            self._send(self.snd_una, flags, payload)
        elif self.host_eof:
            self._send(self.snd_una, _FIN | _ACK)

    # --- timers ------------------------------------------------------------------------

    def _arm(self, now: float, *, restart: bool = False) -> None:
        """Keep the retransmission (or persist) timer running while it is needed.

        RFC 6298 §5: a running timer is not pushed back by further sends or segments, only
        restarted when new data is acknowledged (`restart`), so a steady stream from the
        enclave cannot postpone a retransmission forever. With nothing in flight but bytes
        held back by a zero window, the same timer sends window probes (RFC 9293 §3.8.6.1).
        """
        state = self.state
        live = state is TcpState.ESTABLISHED or state is TcpState.SYN_SENT
        in_flight = not self.syn_acked or self.snd_una != self.snd_max
        if not live or not (in_flight or self._window_blocked()):
            self.rto_deadline = None
        elif restart or self.rto_deadline is None:
            self.rto_deadline = now + self.rto
        self._set_deadline()

    def _window_blocked(self) -> bool:
        """Bytes (or our FIN) wait unsent and nothing is in flight: only the enclave's
        window holds them."""
        if not self.syn_acked or self.snd_una != self.snd_max:
            return False
        unsent = self.send_buffer.size - seq_diff(self.snd_nxt, self.snd_una)
        return unsent > 0 or (self.host_eof and not self.fin_acked)

    def _set_deadline(self) -> None:
        rto, ack = self.rto_deadline, self.ack_deadline
        deadline = ack if rto is None else rto if ack is None else min(rto, ack)
        if deadline != self.deadline:
            self.deadline = deadline
            self._on_timer_change(self)

    def on_timer(self, now: float) -> None:
        """Send a delayed ACK that is due; on a retransmission timeout, go back to `snd_una`."""
        self._now = now
        if self.ack_deadline is not None and now >= self.ack_deadline:
            self.ack_deadline = None
            if self.ack_pending and self.state is TcpState.ESTABLISHED:
                self._send_ack()
            self._set_deadline()
        rto = self.rto_deadline
        if rto is None or now < rto or self.state is not TcpState.ESTABLISHED:
            return
        self.rto_deadline = None
        if self._window_blocked() or (self.snd_wnd == 0 and self.syn_acked):
            self._probe_zero_window(now)
            return
        self.retries += 1
        if self.retries > MAX_RETRIES:
            self._give_up("enclave stopped acknowledging")
            return
        self.output.stats.tcp["timeouts"] += 1
        self.log.debug("retransmission timeout %d: resending from %d", self.retries, self.snd_una)
        self.rto = min(self.rto * 2, MAX_RTO)
        if not self.syn_acked:
            self._send_syn_ack()
        else:
            self.snd_nxt = self.snd_una
            self._try_send(now)
        self._arm(now)

    def _probe_zero_window(self, now: float) -> None:
        """The enclave's window is zero: ask for it again (RFC 9293 §3.8.6.1) instead of
        retransmitting, which would count a live but slow receiver as dead. Bounded only
        while no ACK answers (`probes`, reset by every ACK) or once the host is gone."""
        self.probes += 1
        if self.probes > MAX_RETRIES:
            self._give_up("enclave stopped answering window probes")
            return
        self.log.debug("zero window: probing")
        self.output.stats.tcp["window_probes"] += 1
        self._send(seq_add(self.snd_una, -1), _ACK)  # the enclave answers with its window
        self.rto = min(self.rto * 2, MAX_RTO)
        self._arm(now)

    # --- ends --------------------------------------------------------------------------

    def _give_up(self, why: str) -> None:
        """The enclave stopped answering: reset both ends of the flow."""
        self.log.warning("%s: resetting flow", why)
        self.output.stats.tcp["given_up"] += 1
        self._send(self.snd_nxt, _RST | _ACK)
        self._finish(reset=True)

    def _refuse(self, error: int) -> None:
        code = _UNREACHABLE_CODES.get(error)
        if code is None:
            self._send(0, _RST | _ACK)
            return
        config = self.output.config
        quoted = (
            build_ipv4_header(config.enclave_ip, IPv4Address(self.builder._src), IpProto.TCP, 20)
            + self.syn_quote
        )
        message = build_icmp(IcmpMessage(IcmpType.DEST_UNREACHABLE, code, 0, 0, quoted))
        self.output.send_ipv4(config.gateway_ip, config.enclave_ip, IpProto.ICMP, message)

    def _maybe_done(self) -> None:
        if self.enclave_fin and self.fin_acked:
            self.log.debug("closed both ways")
            self._finish(reset=False)

    def _finish(self, *, reset: bool) -> None:
        """Forget the flow and close its host socket (abortively with `reset`)."""
        if self.state is TcpState.CLOSED:
            return
        if not reset:
            self._flush_to_host()
            if self.ack_pending and self.state is TcpState.ESTABLISHED and self.syn_acked:
                self._send_ack()  # e.g. for the enclave's FIN that completed the close
        self.state = TcpState.CLOSED
        self.deadline = self.rto_deadline = self.ack_deadline = None
        self.output.send_command(TcpClose(self.flow, reset=reset))
        self._on_timer_change(self)

    def reset(self) -> None:
        """The link went away: abort the host side without telling the (gone) enclave."""
        self._finish(reset=True)

"""Inbound TCP: a flow opened from the host side (an exposed port), towards the enclave.

Theory of operation
-------------------
The shell accepted a client on an exposed port and reports it with `TcpAccepted`; the
host socket stays unread. Here we play the client towards the enclave's kernel: our SYN
(offering MSS and window scale) goes to the enclave port, from the client's real address
as the enclave should see it (127.0.0.1 becomes the host alias). A SYN-ACK makes the flow
an ordinary established `TcpConnection`: we ACK it and let the shell read the host socket
(`TcpResumeReading`). A RST means nothing listens there: the client is reset too. With no
answer, the SYN is re-sent with backoff until `give_up_at`, then the client is reset.
"""

from __future__ import annotations

from collections.abc import Callable

from nitro_netd.frames.tcp import TcpFlags, TcpHeader, TcpOptions
from nitro_netd.netstack.events import FlowId, TcpResumeReading
from nitro_netd.netstack.output import StackOutput
from nitro_netd.netstack.tcp.connection import (
    INITIAL_RTO,
    MAX_RTO,
    TcpConnection,
    TcpState,
    window_scale_for,
)
from nitro_netd.netstack.tcp.segments import SegmentBuilder
from nitro_netd.netstack.tcp.seq import seq_add


class InboundConnection(TcpConnection):
    """A flow whose SYN we send to the enclave."""

    def __init__(
        self,
        flow: FlowId,
        output: StackOutput,
        builder: SegmentBuilder,
        *,
        iss: int,
        buffer: int,
        mss: int,
        give_up_at: float,
        on_timer_change: Callable[[TcpConnection], None],
    ) -> None:
        super().__init__(
            flow,
            output,
            builder,
            None,
            iss=iss,
            buffer=buffer,
            mss=mss,
            on_timer_change=on_timer_change,
        )
        self.state = TcpState.SYN_SENT
        self.give_up_at = give_up_at

    def start(self, now: float) -> None:
        """Send the SYN to the enclave."""
        self._send_syn()
        self.snd_nxt = self.snd_max = seq_add(self.iss, 1)
        self._arm(now)

    def _send_syn(self) -> None:
        options = TcpOptions(mss=self.our_mss, window_scale=window_scale_for(self.buffer))
        frame = self.builder.build(
            self.iss, 0, TcpFlags.SYN, min(self.buffer, 0xFFFF), options=options
        )
        self.output.send_frame(frame)

    def on_segment(self, header: TcpHeader, payload: memoryview, now: float) -> None:
        """Finish the handshake, then behave as any established flow."""
        if self.state is not TcpState.SYN_SENT:
            super().on_segment(header, payload, now)
            return
        flags = header.flags
        if not flags & TcpFlags.ACK or header.ack != seq_add(self.iss, 1):
            return
        if flags & TcpFlags.RST:
            self.log.info(
                "refused by the enclave: nothing listens on port %d", self.builder.destination_port
            )
            self._finish(reset=True)
        elif flags & TcpFlags.SYN:
            self._established(header, now)

    def _established(self, synack: TcpHeader, now: float) -> None:
        self.learn_peer(synack)
        self.state = TcpState.ESTABLISHED
        self.syn_acked = True
        self.snd_una = seq_add(self.iss, 1)
        self.rto, self.retries, self.rto_deadline = INITIAL_RTO, 0, None  # handshake done
        self.log.debug("established")
        self._send_ack()
        self.output.send_command(TcpResumeReading(self.flow))
        self._try_send(now)
        self._arm(now)

    def on_timer(self, now: float) -> None:
        """Re-send the SYN, or give up once the connect deadline passed."""
        if self.state is not TcpState.SYN_SENT:
            super().on_timer(now)
            return
        if self.rto_deadline is None or now < self.rto_deadline:
            return
        if now >= self.give_up_at:
            self.log.info("the enclave did not answer: resetting the client")
            self._finish(reset=True)
            return
        self.rto = min(self.rto * 2, MAX_RTO)
        self.rto_deadline = None
        self._send_syn()
        self._arm(now)

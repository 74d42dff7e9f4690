"""The sans-IO TCP translator, driven by a hand-made enclave peer and an in-memory host."""

from __future__ import annotations

import errno
import logging
import os
import random
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames.checksum import internet_checksum
from nitro_netd.frames.errors import DropReason
from nitro_netd.frames.ethernet import parse_ethernet
from nitro_netd.frames.icmp import IcmpType, UnreachableCode, parse_icmp
from nitro_netd.frames.ipv4 import parse_ipv4
from nitro_netd.frames.tcp import TcpFlags
from nitro_netd.netstack import (
    NetStack,
    StackConfig,
    TcpClose,
    TcpConnect,
    TcpConnected,
    TcpData,
    TcpEof,
    TcpFailed,
    TcpPauseReading,
    TcpRelease,
    TcpResumeReading,
    TcpSend,
    TcpShutdown,
    TcpWriteBlocked,
    TcpWriteUnblocked,
)
from nitro_netd.netstack.output import TSO_MAX_PAYLOAD
from nitro_netd.netstack.spans import HostSpan
from nitro_netd.netstack.tcp.connection import ACK_DELAY, TcpConnection
from nitro_netd.netstack.tcp.seq import seq_add, seq_diff, seq_le
from tests.support.tcp_peer import FakeHost, Segment, TcpPeer

ACK = TcpFlags.ACK


def make(**config: object) -> tuple[NetStack, TcpPeer, FakeHost]:
    stack = NetStack(StackConfig(**config))  # type: ignore[arg-type]
    return stack, TcpPeer(stack), FakeHost()


def test_tcp_ipv4_enclave_syn_asks_host_to_connect_and_waits() -> None:
    stack, peer, host = make()
    peer.syn()
    [command] = host.take_connects(stack)
    assert command == TcpConnect(command.flow, IPv4Address("198.18.0.2"), 80, 10.0)
    assert peer.receive() == []


def test_tcp_ipv4_syn_ack_carries_mss_and_window_scale_once_connected() -> None:
    stack, peer, host = make(mtu=9001)
    peer.syn()
    [connect] = host.take_connects(stack)
    stack.handle_host_event(TcpConnected(connect.flow), now=1.0)
    [(synack, _)] = peer.receive()
    assert synack.flags == TcpFlags.SYN | ACK
    assert synack.ack == peer.isn + 1
    assert synack.options.mss == 9001 - 40
    assert synack.options.window_scale is not None
    assert synack.options.timestamps is None


def test_tcp_ipv4_host_alias_connects_to_parent_loopback() -> None:
    stack, peer, host = make()
    peer.remote = IPv4Address("192.168.127.254")
    peer.syn()
    [command] = host.take(stack)
    assert isinstance(command, TcpConnect)
    assert command.address == IPv4Address("127.0.0.1")


def test_tcp_ipv4_enclave_to_host_small_data_is_sent_at_once_and_acked_once_delayed() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    for chunk in (b"a" * 100, b"b" * 200, b"c" * 300):
        stack.receive_frame(peer.frame(ACK | TcpFlags.PSH, chunk), now=1.0)
        peer.snd_nxt = seq_add(peer.snd_nxt, len(chunk))
    sends = [c for c in host.take(stack) if isinstance(c, TcpSend)]
    assert [(c.flow, c.data) for c in sends] == [(flow, b"a" * 100 + b"b" * 200 + b"c" * 300)]
    assert peer.receive() == []  # small segments: the ACK waits for a reply to ride on
    deadline = stack.get_timer()
    assert deadline is not None
    assert deadline - 1.0 <= 0.001
    stack.handle_timer(now=deadline)
    [(ack, _)] = peer.receive()
    assert ack.ack == peer.snd_nxt


def test_tcp_ipv4_reply_from_host_carries_the_delayed_ack() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    peer.send(ACK | TcpFlags.PSH, b"request")
    stack.handle_host_event(TcpData(flow, b"response"), now=1.0001)
    [(segment, data)] = peer.receive()
    assert (data, segment.ack) == (b"response", peer.snd_nxt)
    timer = stack.get_timer()
    assert timer is not None
    stack.handle_timer(now=timer + 1)  # the retransmission timer: resends, no lone ACK
    assert all(d == b"response" for _, d in peer.receive())


def test_tcp_ipv4_full_sized_segment_is_acked_at_the_end_of_its_batch() -> None:
    _, peer, host = make()
    peer.mss = 1000
    peer.establish(host)
    peer.send(ACK, b"f" * 1000)
    [(ack, _)] = peer.receive()
    assert ack.ack == peer.snd_nxt


def test_tcp_ipv4_host_to_enclave_data_is_segmented_by_mss_within_window() -> None:
    stack, peer, host = make()
    peer.mss = 1000
    peer.window_scale = None
    peer.window = 2500
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, bytes(range(256)) * 20), now=1.0)
    segments = peer.receive()
    assert [len(d) for _, d in segments] == [1000, 1000, 500]
    peer.accept(segments)
    peer.send(ACK, now=1.1)
    segments = peer.receive()
    assert [len(d) for _, d in segments] == [1000, 1000, 500]
    peer.accept(segments)
    peer.send(ACK, now=1.2)
    peer.accept(peer.receive())
    assert bytes(peer.received) == bytes(range(256)) * 20


def test_tcp_ipv4_enclave_fin_first_then_host_eof_closes_gracefully() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    peer.send(ACK | TcpFlags.FIN)
    assert TcpShutdown(flow) in host.take(stack)
    assert peer.receive() == []  # the FIN's ACK waits for our FIN to ride on
    stack.handle_host_event(TcpData(flow, b"bye"), now=1.0002)
    stack.handle_host_event(TcpEof(flow), now=1.0002)
    segments = peer.receive()
    assert segments[-1][0].flags & TcpFlags.FIN
    assert all(s.ack == peer.snd_nxt and (data or s.flags & TcpFlags.FIN) for s, data in segments)
    peer.accept(segments)
    assert peer.received == b"bye"
    peer.send(ACK)
    assert TcpClose(flow, reset=False) in host.take(stack)
    assert stack.tcp.flows == {}


def test_tcp_ipv4_enclave_fin_is_acked_after_the_delay_while_the_host_stays_open() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    peer.send(ACK | TcpFlags.FIN, now=1.0)
    assert TcpShutdown(flow) in host.take(stack)
    assert peer.receive() == []
    deadline = stack.get_timer()
    assert deadline is not None
    assert deadline <= 1.0 + ACK_DELAY
    stack.handle_timer(now=deadline)
    [(ack, _)] = peer.receive()
    assert (ack.flags, ack.ack) == (ACK, peer.snd_nxt)
    stack.handle_host_event(TcpData(flow, b"more"), now=2.0)  # the host may still talk
    [(segment, data)] = peer.receive()
    assert (data, segment.ack) == (b"more", peer.snd_nxt)


def test_tcp_ipv4_enclave_fin_sent_again_is_acked_at_once() -> None:
    _, peer, host = make()
    peer.establish(host)
    peer.send(ACK | TcpFlags.FIN)
    peer.send(ACK | TcpFlags.FIN, seq=seq_add(peer.snd_nxt, -1))  # its FIN, again
    [(ack, _)] = peer.receive()
    assert ack.ack == peer.snd_nxt


def test_tcp_ipv4_flow_log_lines_name_the_flow(caplog: pytest.LogCaptureFixture) -> None:
    _, peer, host = make()
    peer.establish(host)
    with caplog.at_level(logging.INFO, logger="nitro_netd.netstack.tcp"):
        peer.send(TcpFlags.RST | ACK)
    [message] = [r.getMessage() for r in caplog.records if "reset by enclave" in r.getMessage()]
    assert message == "[tcp 192.168.127.2:40000→198.18.0.2:80] reset by enclave"


def test_tcp_ipv4_host_eof_first_keeps_enclave_direction_open() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    stack.handle_host_event(TcpEof(flow), now=1.0)
    [(fin, _)] = peer.receive()
    assert fin.flags & TcpFlags.FIN
    peer.accept([(fin, b"")])
    peer.send(ACK)
    peer.send(ACK | TcpFlags.PSH, b"still talking")
    commands = host.take(stack)
    assert (flow, b"still talking") in [
        (c.flow, c.data) for c in commands if isinstance(c, TcpSend)
    ]
    assert not any(isinstance(c, TcpClose) for c in commands)
    peer.send(ACK | TcpFlags.FIN)
    assert TcpClose(flow, reset=False) in host.take(stack)


def test_tcp_ipv4_connect_refused_answers_syn_with_rst() -> None:
    stack, peer, host = make()
    peer.syn()
    [connect] = host.take_connects(stack)
    stack.handle_host_event(TcpFailed(connect.flow, errno.ECONNREFUSED), now=1.0)
    [(rst, _)] = peer.receive()
    assert rst.flags == TcpFlags.RST | ACK
    assert rst.ack == peer.isn + 1
    assert stack.tcp.flows == {}


def test_tcp_ipv4_connect_timeout_answers_with_icmp_host_unreachable_quoting_syn() -> None:
    stack, peer, host = make()
    peer.syn()
    [connect] = host.take_connects(stack)
    stack.handle_host_event(TcpFailed(connect.flow, errno.ETIMEDOUT), now=11.0)
    [frame] = stack.frames_to_send()
    _, payload = parse_ethernet(frame)
    _, body = parse_ipv4(payload)
    message = parse_icmp(body)
    assert (message.type, message.code) == (IcmpType.DEST_UNREACHABLE, UnreachableCode.HOST)
    quoted_ip, quoted_tcp = parse_ipv4(message.payload[:20] + bytes(20))[0], message.payload[20:28]
    assert quoted_ip.destination == peer.remote
    assert int.from_bytes(quoted_tcp[4:8], "big") == peer.isn


def test_tcp_ipv4_rst_from_enclave_resets_host_socket() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    peer.send(TcpFlags.RST | ACK)
    assert TcpClose(flow, reset=True) in host.take(stack)
    assert stack.tcp.flows == {}


def test_tcp_ipv4_bytes_before_an_enclave_rst_in_the_same_batch_reach_the_host_first() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    for frame in (
        peer.frame(ACK | TcpFlags.PSH, b"last words"),
        peer.frame(TcpFlags.RST | ACK, seq=seq_add(peer.snd_nxt, 10)),
    ):
        stack.receive_frame(memoryview(bytearray(frame)), now=1.0)
    commands = host.take(stack)
    sends = [(c.flow, c.data) for c in commands if isinstance(c, TcpSend)]
    assert sends == [(flow, b"last words")]
    assert commands.index(TcpClose(flow, reset=True)) > next(
        i for i, c in enumerate(commands) if isinstance(c, TcpSend)
    )


def test_tcp_ipv4_host_reset_sends_rst_to_enclave() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    stack.handle_host_event(TcpFailed(flow, errno.ECONNRESET), now=1.0)
    [(rst, _)] = peer.receive()
    assert rst.flags & TcpFlags.RST
    assert TcpClose(flow, reset=False) in host.take(stack)


def test_tcp_ipv4_lost_segment_is_retransmitted_on_timeout() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"x" * 500), now=1.0)
    [(first, data)] = peer.receive()  # "lost": not accepted
    deadline = stack.get_timer()
    assert deadline is not None
    stack.handle_timer(now=deadline)
    [(again, data2)] = peer.receive()
    assert (again.seq, data2) == (first.seq, data)
    assert stack.stats.tcp["timeouts"] == 1
    assert stack.stats.tcp["fast_retransmits"] == 0


def test_tcp_ipv4_an_enclave_that_stops_acknowledging_is_given_up_and_counted() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"x" * 500), now=1.0)
    peer.receive()
    for _ in range(100):
        deadline = stack.get_timer()
        if deadline is None:
            break
        stack.handle_timer(now=deadline)
        peer.receive()
    assert TcpClose(flow, reset=True) in host.take(stack)
    assert stack.stats.tcp["given_up"] == 1
    assert stack.stats.snapshot()["tcp"] == {
        "fast_retransmits": 0,
        "timeouts": stack.stats.tcp["timeouts"],
        "window_probes": 0,
        "given_up": 1,
    }


def test_tcp_ipv4_three_duplicate_acks_trigger_fast_retransmit() -> None:
    stack, peer, host = make()
    peer.mss = 100
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"y" * 500), now=1.0)
    segments = peer.receive()
    assert len(segments) == 5
    for _ in range(3):
        peer.send(ACK)
    [(again, data)] = peer.receive()
    assert again.seq == segments[0][0].seq
    assert data == b"y" * 100
    assert stack.stats.tcp["fast_retransmits"] == 1


def test_tcp_ipv4_zero_window_holds_data_until_update() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    peer.send(ACK, window=0)
    stack.handle_host_event(TcpData(flow, b"z" * 10), now=1.0)
    assert peer.receive() == []
    peer.send(ACK, window=100)
    [(_, data)] = peer.receive()
    assert data == b"z" * 10


def test_tcp_ipv4_write_blocked_freezes_window_then_update_reopens_it() -> None:
    stack, peer, host = make(tcp_buffer=10000)
    peer.window_scale = None
    flow = peer.establish(host)
    stack.handle_host_event(TcpWriteBlocked(flow), now=1.0)
    peer.send(ACK | TcpFlags.PSH, b"q" * 4000)
    [(ack, _)] = peer.receive()
    assert ack.window == 6000
    stack.handle_host_event(TcpWriteUnblocked(flow), now=1.0)
    [(update, _)] = peer.receive()
    assert update.window == 10000


def test_tcp_ipv4_data_past_window_is_trimmed_and_counted() -> None:
    stack, peer, host = make(tcp_buffer=1000)
    peer.window_scale = None
    flow = peer.establish(host)
    stack.handle_host_event(TcpWriteBlocked(flow), now=1.0)
    peer.send(ACK, b"w" * 1500)
    sent = b"".join(c.data for c in host.take(stack) if isinstance(c, TcpSend))
    assert sent == b"w" * 1000
    assert stack.stats.drops[DropReason.OUT_OF_WINDOW] == 1


def test_tcp_ipv4_gap_is_dropped_and_answered_with_duplicate_ack() -> None:
    stack, peer, host = make()
    peer.establish(host)
    expected = peer.snd_nxt
    peer.send(ACK, b"later", seq=seq_add(expected, 100))
    assert not [c for c in host.take(stack) if isinstance(c, TcpSend)]
    [(dup, _)] = peer.receive()
    assert dup.ack == expected
    assert stack.stats.drops[DropReason.OUT_OF_ORDER] == 1


def test_tcp_ipv4_retransmitted_data_is_trimmed_not_duplicated() -> None:
    stack, peer, host = make()
    peer.establish(host)
    start = peer.snd_nxt
    peer.send(ACK, b"hello")
    peer.send(ACK, b"hello world", seq=start)
    sent = b"".join(c.data for c in host.take(stack) if isinstance(c, TcpSend))
    assert sent == b"hello world"


def test_tcp_ipv4_send_buffer_over_limit_pauses_and_resumes_host_reading() -> None:
    stack, peer, host = make(tcp_buffer=4000)
    peer.window = 1000
    peer.window_scale = None
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"p" * 5000), now=1.0)
    assert TcpPauseReading(flow) in host.take(stack)
    for _ in range(5):
        peer.accept(peer.receive())
        peer.send(ACK)
    assert TcpResumeReading(flow) in host.take(stack)


def test_tcp_ipv4_segment_without_flow_gets_rst_and_is_counted() -> None:
    stack, peer, _ = make()
    peer.snd_nxt, peer.rcv_nxt = 5000, 777
    peer.send(ACK, b"stray")
    [(rst, _)] = peer.receive()
    assert rst.flags == TcpFlags.RST
    assert rst.seq == 777
    assert stack.stats.drops[DropReason.NO_FLOW] == 1


def test_tcp_ipv4_pending_connect_limit_refuses_with_rst_and_counts() -> None:
    stack, _, host = make(max_pending_connects=2)
    for port in (1, 2, 3):
        TcpPeer(stack, port=port).syn()
    assert len(host.take(stack)) == 2
    [(rst, _)] = TcpPeer(stack, port=3).receive()
    assert rst.flags & TcpFlags.RST
    assert stack.stats.drops[DropReason.LIMIT] == 1


def test_tcp_ipv4_link_reset_aborts_every_host_socket() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    stack.handle_link_reset()
    assert TcpClose(flow, reset=True) in host.take(stack)
    assert stack.tcp.flows == {}


def test_tcp_ipv4_retransmitted_syn_while_connecting_is_ignored() -> None:
    stack, peer, host = make()
    peer.syn()
    peer.syn()
    assert len([c for c in host.take(stack) if isinstance(c, TcpConnect)]) == 1


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=12),
    losses=st.lists(st.booleans(), min_size=1, max_size=50),
    mss=st.integers(min_value=100, max_value=1460),
    window=st.integers(min_value=200, max_value=8000),
)
def test_tcp_ipv4_host_to_enclave_stream_survives_random_loss_exactly(
    chunks: list[bytes], losses: list[bool], mss: int, window: int
) -> None:
    """Whatever frames the enclave's TAP drops, the stream arrives once, whole, in order."""
    stack, peer, host = make()
    peer.mss, peer.window, peer.window_scale = mss, window, None
    flow = peer.establish(host)
    now = 1.0
    for chunk in chunks:
        stack.handle_host_event(TcpData(flow, chunk), now=now)
    stack.handle_host_event(TcpEof(flow), now=now)
    deliver_through_loss(stack, peer, losses, now)
    assert bytes(peer.received) == b"".join(chunks)


def deliver_through_loss(stack: NetStack, peer: TcpPeer, losses: list[bool], now: float) -> None:
    """Let the enclave take the stack's segments, dropping those `losses` says (cyclically;
    every frame is eventually let through), acknowledging and running timers, until the
    stack's FIN arrives."""
    pattern = [*losses, False]
    for round_ in range(1000):
        segments = peer.receive()
        peer.accept([s for i, s in enumerate(segments) if not pattern[(round_ + i) % len(pattern)]])
        if peer.fin_received:
            return
        peer.send(ACK, now=now)
        if not segments and not stack.output.frames:
            timer = stack.get_timer()
            assert timer is not None, "data outstanding but no retransmission timer"
            now = timer
            stack.handle_timer(now=now)
    raise AssertionError("the stream never ended")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80), st.sampled_from(list(TcpFlags)))
def test_tcp_ipv4_arbitrary_segments_on_live_flow_never_raise(
    payload: bytes, flags: TcpFlags
) -> None:
    stack, peer, host = make()
    peer.establish(host)
    peer.send(flags | ACK, payload)
    stack.frames_to_send()
    host.take(stack)
    assert stack.stats.frames_in >= 3


def test_tcp_ipv4_corrupted_segment_on_live_flow_is_dropped_as_bad_checksum() -> None:
    stack, peer, host = make()
    peer.establish(host)
    frame = bytearray(peer.frame(ACK | TcpFlags.PSH, b"payload"))
    frame[-1] ^= 0x55
    stack.receive_frame(memoryview(frame), now=1.0)
    assert not [c for c in host.take(stack) if isinstance(c, TcpSend)]
    assert stack.stats.drops[DropReason.BAD_CHECKSUM] == 1


def test_tcp_ipv4_fast_and_full_paths_deliver_the_same_bytes() -> None:
    """A segment with IP options skips the fast path; both paths must agree."""
    stack, peer, host = make()
    flow = peer.establish(host)
    peer.send(ACK | TcpFlags.PSH, b"fast-")
    plain = peer.frame(ACK | TcpFlags.PSH, b"full")
    ip_header = bytearray(plain[14:34])
    ip_header[0] = 0x46  # IHL 6: one word of options (a NOP padding)
    ip_header[2:4] = (int.from_bytes(ip_header[2:4], "big") + 4).to_bytes(2, "big")
    ip_header[10:12] = b"\x00\x00"
    with_options = ip_header + b"\x01\x01\x01\x00"
    with_options[10:12] = internet_checksum(with_options).to_bytes(2, "big")
    stack.receive_frame(plain[:14] + bytes(with_options) + plain[34:], now=1.0)
    sent = b"".join(c.data for c in host.take(stack) if isinstance(c, TcpSend) and c.flow == flow)
    assert sent == b"fast-full"


def test_tcp_ipv4_checksum_offload_trusts_enclave_and_leaves_pseudo_header_sum() -> None:
    """With offload agreed, partial checksums from the enclave's TAP pass, and our segments
    carry only the folded pseudo-header sum (the agent marks them CHECKSUM_PARTIAL)."""
    stack, peer, host = make()
    stack.set_checksum_offload(True)
    peer.verify_checksums = False
    flow = peer.establish(host)
    frame = bytearray(peer.frame(ACK | TcpFlags.PSH, b"partial"))
    frame[50:52] = b"\x12\x34"  # not a valid checksum: the enclave's kernel left it partial
    stack.receive_frame(memoryview(frame), now=1.0)
    sends = [(c.flow, c.data) for c in host.take(stack) if isinstance(c, TcpSend)]
    assert (flow, b"partial") in sends
    peer.snd_nxt = seq_add(peer.snd_nxt, 7)
    stack.handle_host_event(TcpData(flow, b"z" * 4000), now=1.0)
    raw = next(f for f in stack.frames_to_send() if len(f) > 1000)
    tcp_length = len(raw) - 34
    pseudo = sum(int.from_bytes(raw[i : i + 2], "big") for i in range(26, 34, 2)) + 6 + tcp_length
    while pseudo >> 16:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    assert int.from_bytes(raw[50:52], "big") == pseudo


def test_tcp_ipv4_zero_window_probe_from_enclave_is_answered_with_current_window() -> None:
    """A probe (seq one below rcv_nxt, no data) must get an ACK carrying our window, or a
    lost window update would leave the enclave backing off for minutes."""
    _, peer, host = make()
    peer.establish(host)
    peer.send(ACK, seq=seq_add(peer.snd_nxt, -1))
    [(ack, _)] = peer.receive()
    assert ack.ack == peer.snd_nxt
    assert ack.window > 0


def test_tcp_ipv4_enclave_traffic_does_not_postpone_a_due_retransmission() -> None:
    """RFC 6298 §5: a steady upload from the enclave must not keep pushing back the timer
    of a lost download segment (it used to restart on every incoming segment)."""
    stack, peer, host = make()
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"lost-reply"), now=1.0)
    [(lost, _)] = peer.receive()  # dropped on the way to the enclave
    now = 1.0
    resent = []
    for _ in range(20):  # 2 s of uploads, one every 100 ms
        now += 0.1
        peer.send(ACK | TcpFlags.PSH, b"u" * 1000, now=now)
        while (timer := stack.get_timer()) is not None and timer <= now:
            stack.handle_timer(now=timer)
        resent += [s for s in peer.receive() if s[1] == b"lost-reply"]
    assert resent
    assert resent[0][0].seq == lost.seq


def test_tcp_ipv4_enclave_fin_after_ours_is_acked_before_the_flow_is_forgotten() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    stack.handle_host_event(TcpEof(flow), now=1.0)
    [(fin, _)] = peer.receive()
    peer.accept([(fin, b"")])
    peer.send(ACK | TcpFlags.FIN)  # acknowledges our FIN and closes its side
    [(last, _)] = peer.receive()
    assert last.flags == TcpFlags.ACK
    assert last.ack == peer.snd_nxt
    assert TcpClose(flow, reset=False) in host.take(stack)


def test_tcp_ipv4_zero_window_with_data_waiting_is_probed() -> None:
    stack, peer, host = make()
    flow = peer.establish(host)
    peer.send(ACK, window=0)
    stack.handle_host_event(TcpData(flow, b"held back"), now=1.0)
    assert peer.receive() == []
    timer = stack.get_timer()
    assert timer is not None, "a zero window with data waiting must arm the persist timer"
    stack.handle_timer(now=timer)
    [(probe, data)] = peer.receive()
    assert data == b""
    assert probe.seq == seq_add(peer.rcv_nxt, -1)
    assert stack.stats.tcp["window_probes"] == 1
    assert stack.stats.tcp["timeouts"] == 0


def test_tcp_ipv4_data_with_an_ack_for_unsent_bytes_is_not_delivered() -> None:
    stack, peer, host = make()
    peer.establish(host)
    peer.send(ACK | TcpFlags.PSH, b"forged", ack=seq_add(peer.rcv_nxt, 5000))
    assert not [c for c in host.take(stack) if isinstance(c, TcpSend)]


# --- TCP segmentation offload ---------------------------------------------------------


def make_offloaded(segmentation: bool, **config: object) -> tuple[NetStack, TcpPeer, FakeHost]:
    """`make` for a link that agreed checksum offload, and segmentation offload if asked."""
    stack, peer, host = make(**config)
    stack.set_checksum_offload(True)
    stack.set_segmentation_offload(segmentation)
    peer.verify_checksums = False  # our TCP checksums are left partial for the agent's TAP
    return stack, peer, host


def pseudo_header_sum(raw: bytes | bytearray) -> int:
    """The folded IPv4 pseudo-header sum of a TCP frame without IP options."""
    total = sum(int.from_bytes(raw[i : i + 2], "big") for i in range(26, 34, 2))
    total += 6 + len(raw) - 34
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def assert_contiguous(segments: list[Segment], start: int) -> None:
    seq = start
    for header, data in segments:
        assert header.seq == seq
        seq = seq_add(seq, len(data))


@pytest.mark.parametrize(
    ("segmentation", "mss", "expected"),
    [
        (False, 1460, 1460),
        (False, 536, 536),
        (True, 1460, 44 * 1460),
        (True, 8961, 7 * 8961),
        (True, 536, 122 * 536),
        (True, 65480, 65480),
        (True, TSO_MAX_PAYLOAD, TSO_MAX_PAYLOAD),
        (True, TSO_MAX_PAYLOAD + 1, TSO_MAX_PAYLOAD + 1),
    ],
)
def test_tcp_segment_size(segmentation: bool, mss: int, expected: int) -> None:
    stack = NetStack(StackConfig())
    assert stack.output.segment_size(mss) == mss  # off until a link agrees
    stack.set_segmentation_offload(segmentation)
    assert stack.output.segment_size(mss) == expected


def test_tcp_segment_size_limit_fills_one_link_frame() -> None:
    assert TSO_MAX_PAYLOAD == 65535 - 14 - 20 - 20


@given(st.integers(min_value=1, max_value=TSO_MAX_PAYLOAD))
def test_tcp_segment_size_is_the_most_whole_mss_in_one_frame(mss: int) -> None:
    stack = NetStack(StackConfig())
    stack.set_segmentation_offload(True)
    size = stack.output.segment_size(mss)
    assert size % mss == 0
    assert mss <= size <= TSO_MAX_PAYLOAD < size + mss


def test_tcp_ipv4_segmentation_offload_sends_super_segments_to_the_enclave() -> None:
    stack, peer, host = make_offloaded(True, mtu=1500)
    assert peer.mss == 1460
    flow = peer.establish(host)
    data = random.Random(1).randbytes(200 * 1024)
    stack.handle_host_event(TcpData(flow, data), now=1.0)
    frames = stack.frames_to_send()
    segments = peer.parse(frames)
    assert [len(d) for _, d in segments] == [44 * 1460] * 3 + [200 * 1024 - 3 * 44 * 1460]
    assert all(len(d) % 1460 == 0 for _, d in segments[:-1])
    assert_contiguous(segments, peer.rcv_nxt)
    for raw in frames:
        assert len(raw) <= 65535
        assert int.from_bytes(raw[16:18], "big") == len(raw) - 14  # IPv4 total length
        assert raw[46] >> 4 == 5  # no TCP options: TSO_MAX_PAYLOAD holds
        # the pseudo-header sum over the whole super-segment, as GSO expects
        assert int.from_bytes(raw[50:52], "big") == pseudo_header_sum(raw)
    assert max(len(raw) for raw in frames) == 54 + 44 * 1460
    peer.accept(segments)
    assert bytes(peer.received) == data


def test_tcp_ipv4_without_segmentation_offload_segments_stay_within_the_mss() -> None:
    stack, peer, host = make_offloaded(False, mtu=1500)
    flow = peer.establish(host)
    data = random.Random(2).randbytes(200 * 1024)
    stack.handle_host_event(TcpData(flow, data), now=1.0)
    frames = stack.frames_to_send()
    segments = peer.parse(frames)
    assert max(len(d) for _, d in segments) == 1460
    assert max(len(raw) for raw in frames) == 1514
    assert_contiguous(segments, peer.rcv_nxt)
    peer.accept(segments)
    assert bytes(peer.received) == data


def test_tcp_ipv4_segmentation_offload_respects_a_smaller_enclave_mss() -> None:
    stack, peer, host = make_offloaded(True, mtu=1500)
    peer.mss = 1000
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"m" * 100_000), now=1.0)
    segments = peer.parse(stack.frames_to_send())
    assert [len(d) for _, d in segments] == [65 * 1000, 35 * 1000]


def test_tcp_ipv4_segmentation_offload_stays_within_the_enclave_window() -> None:
    stack, peer, host = make_offloaded(True, mtu=1500)
    peer.window_scale = None
    peer.window = 30000
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"w" * 100_000), now=1.0)
    segments = peer.parse(stack.frames_to_send())
    assert sum(len(d) for _, d in segments) == 30000
    assert all(len(d) <= 44 * 1460 for _, d in segments)


def test_tcp_ipv4_lost_super_segment_is_retransmitted_whole() -> None:
    stack, peer, host = make_offloaded(True, mtu=1500)
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"r" * 100_000), now=1.0)
    first, *_ = peer.receive()  # all "lost"
    deadline = stack.get_timer()
    assert deadline is not None
    stack.handle_timer(now=deadline)
    (again, data), *_ = peer.receive()
    assert (again.seq, len(data)) == (first[0].seq, 44 * 1460)


def test_tcp_ipv4_fast_retransmit_resends_a_whole_super_segment() -> None:
    stack, peer, host = make_offloaded(True, mtu=1500)
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"y" * 150_000), now=1.0)
    segments = peer.receive()
    assert len(segments) == 3
    for _ in range(3):
        peer.send(ACK)
    [(again, data)] = peer.receive()
    assert (again.seq, data) == (segments[0][0].seq, b"y" * 44 * 1460)


def test_tcp_ipv4_super_segment_from_the_enclave_is_delivered_whole_and_acked() -> None:
    """With TSO the enclave's TAP hands over one 60000-byte segment (checksum partial)."""
    stack, peer, host = make_offloaded(True, mtu=1500)
    flow = peer.establish(host)
    payload = random.Random(3).randbytes(60000)
    frame = bytearray(peer.frame(ACK | TcpFlags.PSH, payload))
    assert len(frame) == 60054
    frame[50:52] = b"\x12\x34"  # left partial by the enclave's kernel
    stack.receive_frame(memoryview(frame), now=1.0)
    peer.snd_nxt = seq_add(peer.snd_nxt, len(payload))
    sends = [c for c in host.take(stack) if isinstance(c, TcpSend)]
    assert [(c.flow, c.data) for c in sends] == [(flow, payload)]
    [(ack, _)] = peer.receive()  # more than an MSS unacknowledged: ACKed at once
    assert ack.ack == peer.snd_nxt
    assert stack.stats.drops == {}


@pytest.mark.parametrize("segmentation", [False, True], ids=["mss", "tso"])
def test_tcp_ipv4_fast_retransmit_under_a_small_window_never_passes_what_was_sent(
    segmentation: bool,
) -> None:
    """A super-segment retransmission is cut at snd_max: the enclave's ACK of it is then
    valid, the window opens again and the flow recovers (it used to be reset)."""
    stack, peer, host = make_offloaded(segmentation, mtu=1500)
    peer.window_scale, peer.window = None, 10000
    flow = peer.establish(host)
    data = os.urandom(200_000)
    stack.handle_host_event(TcpData(flow, data), now=1.0)
    conn = stack.tcp.flows[flow]
    first = peer.receive()
    assert sum(len(payload) for _, payload in first) == 10000
    for _ in range(3):  # the first segment was lost: three duplicate ACKs
        peer.send(ACK, now=1.01)
    again = peer.receive()
    assert [(seq_diff(h.seq, conn.snd_una), len(p)) for h, p in again] == [
        (0, len(first[0][1]))  # 1460 bytes; with TSO all 10000 in flight, not 64240
    ]
    assert all(seq_le(seq_add(h.seq, len(p)), conn.snd_max) for h, p in again)
    peer.received.clear()
    peer.accept(first)
    now = 1.02
    while len(peer.received) < len(data) and now < 30:
        peer.send(ACK, now=now)
        peer.window = 10000  # the reader keeps up
        peer.accept(peer.receive())
        assert not [c for c in host.take(stack) if isinstance(c, TcpClose)]
        now += 0.01
    assert bytes(peer.received) == data


def test_tcp_ipv4_bytes_of_a_frame_that_hit_a_stack_bug_still_leave_in_its_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TcpSend chunks are views of the frame: if handling it raised (a bug, which the shell
    contains), its bytes must still be handed over before the frame's buffer is reused."""
    stack, peer, host = make()
    flow = peer.establish(host)
    buffer = bytearray(peer.frame(ACK | TcpFlags.PSH, b"A" * 100))  # the link's buffer
    original = TcpConnection._maybe_done

    def fail_once(self: TcpConnection) -> None:
        monkeypatch.setattr(TcpConnection, "_maybe_done", original)
        raise RuntimeError("a stack bug")

    monkeypatch.setattr(TcpConnection, "_maybe_done", fail_once)
    with pytest.raises(RuntimeError):
        stack.receive_frame(memoryview(buffer), now=1.0)
    peer.snd_nxt = seq_add(peer.snd_nxt, 100)
    sent = [(c.flow, c.data) for c in host.take(stack) if isinstance(c, TcpSend)]
    buffer[:] = bytes(len(buffer))  # the next read overwrites the buffer
    peer.send(ACK | TcpFlags.PSH, b"B" * 10, now=1.1)
    sent += [(c.flow, c.data) for c in host.take(stack) if isinstance(c, TcpSend)]
    assert sent == [(flow, b"A" * 100), (flow, b"B" * 10)]


def test_tcp_ipv4_drain_ends_the_batch_once_and_empties_both_queues() -> None:
    """`drain()` (the shell's call) gives what `commands_to_send()` and `frames_to_send()`
    would, in one go: the coalesced send and the ACK owed."""
    stack, peer, host = make()
    flow = peer.establish(host)
    payload = b"d" * 3000
    for start in range(0, len(payload), 1000):
        peer.send(ACK | TcpFlags.PSH, payload[start : start + 1000], now=1.0)
    commands, frames = stack.drain()
    assert [(c.flow, c.data) for c in commands if isinstance(c, TcpSend)] == [(flow, payload)]
    [(ack, data)] = peer.parse([bytes(f) for f in frames])
    assert (ack.flags, ack.ack, data) == (TcpFlags.ACK, peer.snd_nxt, b"")
    assert stack.drain() == ([], [])


@pytest.mark.parametrize("host_eof", [True, False])
def test_bytes_read_before_the_host_failed_reach_the_enclave_before_the_reset(
    host_eof: bool,
) -> None:
    """The world sent its response (and FIN), then our write of more enclave bytes failed
    (its kernel answered with RST). A direct path would deliver the response first."""
    stack = NetStack(StackConfig())
    peer, host = TcpPeer(stack), FakeHost()
    peer.window_scale, peer.window = None, 2000
    flow = peer.establish(host)
    response = os.urandom(10240)  # five windows' worth
    stack.handle_host_event(TcpData(flow, response), now=1.0)
    if host_eof:
        stack.handle_host_event(TcpEof(flow), now=1.0)
    peer.accept(peer.receive())
    peer.send(TcpFlags.ACK | TcpFlags.PSH, b"more request", now=1.0)
    host.take(stack)
    stack.handle_host_event(TcpFailed(flow, errno.EPIPE), now=1.0)
    late = peer.snd_nxt
    peer.send(TcpFlags.ACK | TcpFlags.PSH, b"even more", now=1.0)  # nowhere to go now
    reset = False
    for _ in range(20):
        segments = peer.receive()
        reset = any(header.flags & TcpFlags.RST for header, _ in segments)
        peer.accept([s for s in segments if not s[0].flags & TcpFlags.RST])
        assert all(seq_le(header.ack, late) for header, _ in segments if header.flags & ACK)
        if reset:
            break
        peer.send(ACK, now=1.0)
    assert reset, "the flow never ended"
    assert bytes(peer.received) == response
    assert peer.fin_received is host_eof
    assert flow not in stack.tcp.flows
    assert stack.stats.drops[DropReason.HOST_FAILED] == 1


def test_a_fin_waits_out_a_zero_window_with_probes_not_retransmissions() -> None:
    """The host closed while the enclave's application was not reading (window 0). A FIN
    sent into the zero window is dropped by the receiver; counted as a retransmission, it
    reset the live flow after MAX_RETRIES (about 84 s)."""
    stack = NetStack(StackConfig())
    peer, host = TcpPeer(stack), FakeHost()
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"x" * 1000), now=1.0)
    peer.accept(peer.receive())
    peer.send(ACK, window=0, now=1.0)  # all read by the kernel; the application is slow
    stack.handle_host_event(TcpEof(flow), now=1.0)
    now = 1.0
    for _ in range(40):  # ten minutes of timers, the enclave answering each probe
        for header, _ in peer.receive():
            assert not header.flags & TcpFlags.FIN, "FIN sent into a zero window"
            peer.send(ACK, window=0, now=now)
        timer = stack.get_timer()
        assert timer is not None, "nothing probes the zero window"
        now = max(now, timer)
        stack.handle_timer(now=now)
        assert not [c for c in host.take(stack) if isinstance(c, TcpClose)], f"reset at {now}"
    peer.send(ACK, window=65535, now=now)  # the application reads: the window opens
    segments = peer.receive()
    assert [bool(header.flags & TcpFlags.FIN) for header, _ in segments][-1:] == [True]
    peer.accept(segments)
    peer.send(ACK | TcpFlags.FIN, now=now)
    assert flow not in stack.tcp.flows


def test_flows_a_lost_link_took_are_reset_in_the_enclave_once_a_link_is_back() -> None:
    """The agent reconnects while the enclave's kernel keeps its sockets: a connection
    waiting for the world (a half-closed request, a long poll) must end, not wait for ever."""
    stack = NetStack(StackConfig())
    peer, host = TcpPeer(stack), FakeHost()
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"partial"), now=1.0)
    peer.accept(peer.receive())
    peer.send(ACK | TcpFlags.FIN, now=1.0)  # request sent, waiting for the rest
    peer.receive()
    connecting = TcpPeer(stack, port=40001)
    connecting.syn()  # still connecting: its SYN is retransmitted, no RST owed
    stack.handle_link_reset()  # the link is gone
    assert flow not in stack.tcp.flows
    assert stack.frames_to_send() == []
    assert TcpClose(flow, reset=True) in host.take(stack)
    stack.handle_link_reset()  # a new link replaces nothing more
    stack.handle_link_up()
    segments = peer.receive()
    assert [(h.flags, h.seq, h.ack) for h, _ in segments] == [
        (TcpFlags.RST | TcpFlags.ACK, peer.rcv_nxt, peer.snd_nxt)
    ]
    assert connecting.receive() == []
    stack.handle_link_up()  # owed once
    assert peer.receive() == []


def test_a_reopened_window_does_not_inherit_the_probes_backed_off_timer() -> None:
    stack = NetStack(StackConfig())
    peer, host = TcpPeer(stack), FakeHost()
    flow = peer.establish(host)
    peer.send(ACK, window=0, now=1.0)
    stack.handle_host_event(TcpData(flow, b"x" * 1000), now=1.0)
    now = 1.0
    for _ in range(5):  # probes back off: 0.2, 0.4, ... seconds
        timer = stack.get_timer()
        assert timer is not None
        now = timer
        stack.handle_timer(now=now)
        peer.receive()
        peer.send(ACK, window=0, now=now)
    peer.send(ACK, window=65535, now=now)  # the window opens; the data goes out...
    assert sum(len(data) for _, data in peer.receive()) == 1000
    timer = stack.get_timer()  # ...and is lost: its retransmission is not 10 s away
    assert timer is not None
    assert timer - now <= 1.0


def test_a_fin_lost_as_the_window_closes_is_probed_for_and_sent_when_it_opens() -> None:
    """Our FIN went out and was lost (the enclave's TAP queue was full); the enclave then
    acknowledged the data with a zero window. Timeouts must probe, not count a live
    receiver as dead, and the FIN must go again once the window opens."""
    stack = NetStack(StackConfig())
    peer, host = TcpPeer(stack), FakeHost()
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"x" * 1000), now=1.0)
    peer.accept(peer.receive())
    stack.handle_host_event(TcpEof(flow), now=1.0)
    assert [h.flags & TcpFlags.FIN for h, _ in peer.receive()] == [TcpFlags.FIN]  # lost
    peer.send(ACK, window=0, now=1.0)  # the data acknowledged, no room left
    now = 1.0
    for _ in range(40):  # ten minutes of timers, every probe answered
        for _header, _data in peer.receive():
            peer.send(ACK, window=0, now=now)
        timer = stack.get_timer()
        assert timer is not None
        now = max(now, timer)
        stack.handle_timer(now=now)
        assert not [c for c in host.take(stack) if isinstance(c, TcpClose)], f"reset at {now}"
    peer.send(ACK, window=65535, now=now)
    segments = peer.receive()
    assert any(header.flags & TcpFlags.FIN for header, _ in segments), "the FIN never came again"
    peer.accept(segments)
    assert peer.fin_received


def test_an_orphans_window_probes_are_bounded_even_when_answered() -> None:
    """The host failed with bytes queued and the enclave's application stopped reading:
    with no host socket left, the flow must not probe the zero window for ever."""
    stack = NetStack(StackConfig())
    peer, host = TcpPeer(stack), FakeHost()
    peer.window_scale, peer.window = None, 1000
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"x" * 5000), now=1.0)
    peer.accept(peer.receive())
    peer.send(ACK, window=0, now=1.0)
    stack.handle_host_event(TcpFailed(flow, errno.ECONNRESET), now=1.0)
    now = 1.0
    for _ in range(100):
        for _header, _data in peer.receive():
            peer.send(ACK, window=0, now=now)
        timer = stack.get_timer()
        if timer is None:
            break
        now = max(now, timer)
        stack.handle_timer(now=now)
    assert flow not in stack.tcp.flows, "the orphan flow probes for ever"


def test_a_flow_with_bytes_in_flight_when_the_link_went_gets_a_reset_the_enclave_takes() -> None:
    """The enclave takes a RST only at exactly its rcv_nxt (RFC 5961), which is somewhere
    between what it acknowledged and what we sent: both ends get one."""
    stack = NetStack(StackConfig())
    peer, host = TcpPeer(stack), FakeHost()
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, b"lost with the link"), now=1.0)
    sent = peer.receive()  # never acknowledged: the link went
    stack.handle_link_reset()
    stack.handle_link_up()
    resets = [(h.flags, h.seq) for h, _ in peer.receive()]
    end = seq_add(peer.rcv_nxt, len(sent[0][1]))
    assert resets == [
        (TcpFlags.RST | TcpFlags.ACK, end),
        (TcpFlags.RST | TcpFlags.ACK, peer.rcv_nxt),
    ]


# --- bytes the shell holds (HostSpan) ------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=3000)), max_size=12),
    losses=st.lists(st.booleans(), min_size=1, max_size=30),
    segmentation=st.booleans(),
)
def test_a_stream_given_partly_as_spans_arrives_exactly_through_random_loss(
    chunks: list[tuple[bool, bytes]], losses: list[bool], segmentation: bool
) -> None:
    """Bytes and spans mixed (a flow that began splicing): whatever frames the enclave's
    TAP drops, each segment names the right stream bytes (the peer resolves them from
    the host's stream and checks `released`), and the stream arrives once, in order."""
    stack, peer, host = make_offloaded(segmentation)
    peer.mss, peer.window, peer.window_scale = 1000, 6000, None
    peer.host_stream = bytearray()
    flow = peer.establish(host)
    for as_span, data in chunks:
        peer.host_stream += data
        given_data = HostSpan(None, len(data)) if as_span else data
        stack.handle_host_event(TcpData(flow, given_data), now=1.0)
    stack.handle_host_event(TcpEof(flow), now=1.0)
    deliver_through_loss(stack, peer, losses, 1.0)
    assert peer.received == peer.host_stream


def test_spans_without_checksum_offload_are_refused_by_the_segment_builder() -> None:
    """The stack cannot checksum bytes it does not hold: a shell that gave spans on a link
    without offload has a bug, and the builder says so instead of sending a frame with a
    wrong checksum (the bridge logs it with its traceback)."""
    stack, peer, host = make()
    flow = peer.establish(host)
    with pytest.raises(TypeError, match="checksum offload"):
        stack.handle_host_event(TcpData(flow, HostSpan(None, 5000)), now=1.0)


def test_a_host_failure_that_lost_the_held_bytes_resets_the_enclave_at_once() -> None:
    """`data_lost`: the shell's pipes failed, so the bytes cannot be delivered first."""
    stack, peer, host = make_offloaded(False)
    peer.window_scale, peer.window = None, 1000
    peer.host_stream = bytearray(os.urandom(5000))
    flow = peer.establish(host)
    stack.handle_host_event(TcpData(flow, HostSpan(None, 5000)), now=1.0)
    peer.accept(peer.receive())
    stack.handle_host_event(TcpFailed(flow, errno.EIO, data_lost=True), now=1.0)
    segments = peer.receive()
    assert [h.flags & TcpFlags.RST for h, _ in segments] == [TcpFlags.RST]
    assert flow not in stack.tcp.flows


@pytest.mark.parametrize("as_spans", [True, False], ids=["spans", "bytes"])
def test_once_every_span_is_acknowledged_the_shell_may_let_go_once(as_spans: bool) -> None:
    """`TcpRelease` at the stream position everything before which the enclave has
    acknowledged, once no span is held any more (an idle keep-alive connection must not
    pin the pages its download used); never for a flow given plain bytes."""
    stack, peer, host = make_offloaded(False)
    peer.window_scale, peer.window = None, 3000
    peer.host_stream = bytearray(os.urandom(7000))
    flow = peer.establish(host)
    host.take(stack)
    for start in (0, 4000):
        chunk = bytes(peer.host_stream[start : start + (4000 if start == 0 else 3000)])
        data = HostSpan(None, len(chunk)) if as_spans else chunk
        stack.handle_host_event(TcpData(flow, data), now=1.0)
    releases: list[TcpRelease] = []
    for _ in range(10):
        peer.accept(peer.receive())
        peer.send(ACK, now=1.0)
        releases += [c for c in host.take(stack) if isinstance(c, TcpRelease)]
        if len(peer.received) == 7000:
            break
    assert peer.received == peer.host_stream
    assert releases == ([TcpRelease(flow, 7000)] if as_spans else [])

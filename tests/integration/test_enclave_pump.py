"""The agent's frame pump, unprivileged: a SOCK_SEQPACKET socketpair stands in for the TAP
and a unix stream socketpair for the link. Thousands of random frames of random sizes go
both ways at once, in both framings, and must arrive intact and in order.

With ``vnet_hdr`` the fake TAP plays an ``IFF_VNET_HDR`` TAP: the test writes a 10-byte
virtio-net header before each frame it puts in, and finds one before each frame it takes
out. With segmentation offload (``gso_size``) those headers may be GSO ones."""

from __future__ import annotations

import platform
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from nitro_netd.enclave.pump import (
    COALESCE_LIMIT,
    DirectionStats,
    PumpResult,
    pump_link_to_tap,
    pump_tap_to_link,
    run_pump,
)
from nitro_netd.link import MIN_FRAME, FrameDecoder, LinkProtocol, encode_frame
from tests.support.vnet_frames import (
    NEEDS_CSUM,
    PLAIN_HEADER,
    PROTO_TCP,
    PROTO_UDP,
    VNET_GSO_ECN,
    VNET_GSO_TCPV4,
    VNET_GSO_TCPV6,
    VNET_GSO_UDP,
    expected_header,
    ipv4_frame,
    mixed_frames,
    vnet_header,
)

FRAMES_PER_DIRECTION = 3000
MAX_TEST_FRAME = 65535
DEADLINE = 60.0


def random_frames(seed: int, count: int) -> list[bytes]:
    """Frames of random sizes, small ones most often, always including min and max."""
    rng = random.Random(seed)
    sizes = [MIN_FRAME, MAX_TEST_FRAME]
    for _ in range(count - 2):
        band = rng.random()
        if band < 0.4:
            sizes.append(rng.randint(MIN_FRAME, 200))
        elif band < 0.7:
            sizes.append(rng.randint(201, 9014))
        else:
            sizes.append(rng.randint(9015, MAX_TEST_FRAME))
    rng.shuffle(sizes)
    return [rng.randbytes(size) for size in sizes]


@dataclass
class PumpRig:
    """The pump running in a thread between a fake TAP and a link socketpair."""

    protocol: LinkProtocol
    tap_agent: socket.socket
    tap_test: socket.socket
    link_agent: socket.socket
    link_test: socket.socket
    result: list[PumpResult] = field(default_factory=list)
    thread: threading.Thread | None = None
    vnet_hdr: bool = False
    csum_offload: bool = False
    gso_size: int = 0
    max_frame: int | None = None

    def start(self) -> None:
        def run() -> None:
            self.result.append(
                run_pump(
                    self.tap_agent.fileno(),
                    self.link_agent,
                    self.protocol,
                    max_frame=self.max_frame,
                    vnet_hdr=self.vnet_hdr,
                    csum_offload=self.csum_offload,
                    gso_size=self.gso_size,
                )
            )

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait_result(self, timeout: float = 10.0) -> PumpResult:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the pump did not stop"
        return self.result[0]


@pytest.fixture(params=list(LinkProtocol), ids=lambda p: p.value)
def rig(request: pytest.FixtureRequest) -> Iterator[PumpRig]:
    protocol: LinkProtocol = request.param
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link_agent, link_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (tap_agent, tap_test):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    rig = PumpRig(protocol, tap_agent, tap_test, link_agent, link_test)
    yield rig
    link_test.close()  # ends the pump if a test did not
    if rig.thread is not None:
        rig.thread.join(10)
    for sock in (tap_agent, tap_test, link_agent):
        sock.close()


def send_frames_into_tap(tap: socket.socket, frames: list[bytes]) -> threading.Thread:
    thread = threading.Thread(target=lambda: [tap.send(f) for f in frames], daemon=True)
    thread.start()
    return thread


def send_stream_into_link(
    link: socket.socket, protocol: LinkProtocol, frames: list[bytes]
) -> threading.Thread:
    data = b"".join(encode_frame(protocol, frame) for frame in frames)
    thread = threading.Thread(target=lambda: link.sendall(data), daemon=True)
    thread.start()
    return thread


def receive_from_link(link: socket.socket, protocol: LinkProtocol, count: int) -> list[bytes]:
    decoder = FrameDecoder(protocol)
    frames: list[bytes] = []
    link.settimeout(DEADLINE)
    while len(frames) < count:
        n = link.recv_into(decoder.get_buffer())
        assert n, f"link closed after {len(frames)} of {count} frames"
        decoder.buffer_updated(n)
        while (frame := decoder.maybe_next_frame()) is not None:
            frames.append(bytes(frame))
    return frames


def receive_from_tap(tap: socket.socket, count: int) -> list[bytes]:
    tap.settimeout(DEADLINE)
    return [tap.recv(MAX_TEST_FRAME + 100) for _ in range(count)]


def exchange_both_ways(
    rig: PumpRig, into_tap: list[bytes], inbound: list[bytes]
) -> tuple[list[bytes], list[list[bytes]]]:
    """Send `into_tap` into the TAP and `inbound` into the link at once; return the frames
    that came out of the link, and (in a list, empty if the reader never finished) those
    that came out of the TAP."""
    senders = [
        send_frames_into_tap(rig.tap_test, into_tap),
        send_stream_into_link(rig.link_test, rig.protocol, inbound),
    ]
    received_inbound: list[list[bytes]] = []
    reader = threading.Thread(
        target=lambda: received_inbound.append(receive_from_tap(rig.tap_test, len(inbound))),
        daemon=True,
    )
    reader.start()
    received_outbound = receive_from_link(rig.link_test, rig.protocol, len(into_tap))
    reader.join(DEADLINE)
    for sender in senders:
        sender.join(DEADLINE)
    return received_outbound, received_inbound


def test_pump_random_frames_both_ways_arrive_intact_and_in_order(rig: PumpRig) -> None:
    outbound = random_frames(1, FRAMES_PER_DIRECTION)
    inbound = random_frames(2, FRAMES_PER_DIRECTION)
    rig.start()
    received_outbound, received_inbound = exchange_both_ways(rig, outbound, inbound)
    assert received_outbound == outbound
    assert received_inbound == [inbound]

    rig.link_test.close()
    result = rig.wait_result()
    assert result.reason == "parent closed the link"
    assert result.link_to_tap.stats.frames == len(inbound)
    assert result.tap_to_link.stats.frames == len(outbound)
    assert result.tap_to_link.reason == "stopped"


def test_pump_tap_closed_ends_the_session(rig: PumpRig) -> None:
    rig.start()
    rig.tap_test.send(b"\x01" * 60)
    assert receive_from_link(rig.link_test, rig.protocol, 1) == [b"\x01" * 60]
    rig.tap_test.close()
    result = rig.wait_result()
    assert result.reason == "tap closed"
    assert result.link_to_tap.reason == "stopped"


def test_pump_bad_length_from_parent_ends_the_session_with_reason(rig: PumpRig) -> None:
    rig.start()
    good = b"\x02" * 100
    rig.link_test.sendall(encode_frame(rig.protocol, good) + b"\x05\x00\x00\x00" + b"x" * 20)
    assert receive_from_tap(rig.tap_test, 1) == [good]
    result = rig.wait_result()
    assert result.reason.startswith("bad frame from the parent: invalid frame length")


def test_pump_initial_bytes_are_delivered_first(rig: PumpRig) -> None:
    first, second = b"\x03" * 50, b"\x04" * 70
    rig.result.clear()

    def run() -> None:
        initial = encode_frame(rig.protocol, first)
        rig.result.append(
            run_pump(rig.tap_agent.fileno(), rig.link_agent, rig.protocol, initial=initial)
        )

    rig.thread = threading.Thread(target=run, daemon=True)
    rig.thread.start()
    rig.link_test.sendall(encode_frame(rig.protocol, second))
    assert receive_from_tap(rig.tap_test, 2) == [first, second]


def test_pump_stop_fd_stops_both_directions(rig: PumpRig) -> None:
    import os

    stop_r, stop_w = os.pipe()
    try:

        def run() -> None:
            rig.result.append(
                run_pump(rig.tap_agent.fileno(), rig.link_agent, rig.protocol, stop_fd=stop_r)
            )

        rig.thread = threading.Thread(target=run, daemon=True)
        rig.thread.start()
        os.write(stop_w, b"x")
        result = rig.wait_result()
        assert result.reason == "agent stopping"
        assert result.tap_to_link.reason == result.link_to_tap.reason == "stopped"
    finally:
        os.close(stop_r)
        os.close(stop_w)


class RecordingSender:
    """Stands in for the link socket: records each send's bytes."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def sendall(self, data: memoryview, /) -> None:
        self.sends.append(bytes(data))


@pytest.mark.parametrize("protocol", list(LinkProtocol), ids=lambda p: p.value)
def test_tap_to_link_coalesces_small_frames_and_sends_large_ones_alone(
    protocol: LinkProtocol,
) -> None:
    frames = [b"\x05" * 100] * 500 + [b"\x06" * 40000] + [b"\x07" * 1500] * 30 + [b"\x08" * 65535]
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with tap_agent, tap_test:
        tap_test.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        tap_agent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        for frame in frames:
            tap_test.send(frame)
        tap_test.close()
        tap_agent.setblocking(False)
        sender = RecordingSender()
        stats = DirectionStats()
        reason = pump_tap_to_link(tap_agent.fileno(), sender, protocol, stats)

    assert reason == "tap closed"
    assert stats.frames == len(frames)
    assert len(sender.sends) < len(frames) // 10
    header = protocol.header_size
    for chunk in sender.sends:
        decoder = FrameDecoder(protocol)
        decoder.receive_data(chunk)
        in_chunk = []
        while (decoded := decoder.maybe_next_frame()) is not None:
            in_chunk.append(len(decoded))
        assert decoder.pending == 0
        assert len(chunk) <= COALESCE_LIMIT or in_chunk == [len(chunk) - header]
    decoder = FrameDecoder(protocol)
    decoder.receive_data(b"".join(sender.sends))
    assert [bytes(f) for f in iter(decoder.maybe_next_frame, None)] == frames


def test_tap_to_link_drops_runt_frames() -> None:
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with tap_agent, tap_test:
        tap_test.send(b"\x01" * 5)
        tap_test.send(b"\x02" * 20)
        tap_test.close()
        tap_agent.setblocking(False)
        sender = RecordingSender()
        stats = DirectionStats()
        pump_tap_to_link(tap_agent.fileno(), sender, LinkProtocol.GVPROXY, stats)
    assert (stats.frames, stats.dropped) == (1, 1)
    assert sender.sends == [encode_frame(LinkProtocol.GVPROXY, b"\x02" * 20)]


def test_pump_throughput_smoke(rig: PumpRig) -> None:
    """Not a benchmark: checks that large frames move at a sane rate (> 100 Mbit/s)."""
    frame = b"\x09" * 65000
    count = 2000
    rig.start()
    start = time.monotonic()
    sender = send_frames_into_tap(rig.tap_test, [frame] * count)
    received = receive_from_link(rig.link_test, rig.protocol, count)
    elapsed = time.monotonic() - start
    sender.join(DEADLINE)
    assert len(received) == count
    assert count * len(frame) * 8 / elapsed > 100e6


# --- with virtio-net headers (an IFF_VNET_HDR TAP) -------------------------------------


GSO_SIZE = 1460
"""What the agent passes at an MTU of 1500 (MTU - 40)."""


def gso_tap_header(gso_type: int = VNET_GSO_TCPV4) -> bytes:
    """A header the kernel puts before a super-segment it hands over (TSO on)."""
    return vnet_header(NEEDS_CSUM, gso_type, hdr_len=54, gso_size=1448, csum_start=34,
                       csum_offset=16)  # fmt: skip


@pytest.fixture(
    params=[(False, 0), (True, 0), (True, GSO_SIZE)], ids=["offload-off", "offload-on", "tso"]
)
def vnet_rig(request: pytest.FixtureRequest, rig: PumpRig) -> PumpRig:
    """`rig` (both framings) with virtio-net headers: checksum offload off, on, and on with
    segmentation offload."""
    rig.vnet_hdr = True
    rig.csum_offload, rig.gso_size = request.param
    return rig


def tap_headers(seed: int, count: int, tso: bool = False) -> list[bytes]:
    """Headers the kernel may put before frames it hands over: zero, NEEDS_CSUM, DATA_VALID,
    and with `tso` GSO TCP/IPv4 ones (with and without ECN)."""
    rng = random.Random(seed)
    choices = [PLAIN_HEADER, vnet_header(NEEDS_CSUM, csum_start=34, csum_offset=16),
               vnet_header(2)]  # fmt: skip
    if tso:
        choices += [gso_tap_header(), gso_tap_header(VNET_GSO_TCPV4 | VNET_GSO_ECN)]
    return [rng.choice(choices) for _ in range(count)]


def split_headers(messages: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    return [m[:10] for m in messages], [m[10:] for m in messages]


def test_pump_vnet_frames_both_ways_arrive_intact_and_in_order(vnet_rig: PumpRig) -> None:
    rig = vnet_rig
    outbound = random_frames(3, FRAMES_PER_DIRECTION // 2) + mixed_frames(4, 500)
    inbound = random_frames(5, FRAMES_PER_DIRECTION // 2) + mixed_frames(6, 500)
    headers = tap_headers(7, len(outbound), tso=rig.gso_size > 0)
    rig.start()
    into_tap = [h + f for h, f in zip(headers, outbound, strict=True)]
    received_outbound, received_inbound = exchange_both_ways(rig, into_tap, inbound)
    assert received_outbound == outbound  # headers stripped, frames unchanged
    assert len(received_inbound) == 1
    got_headers, got_frames = split_headers(received_inbound[0])
    assert got_frames == inbound
    assert got_headers == [expected_header(f, rig.csum_offload, rig.gso_size) for f in inbound]
    marked = sum(h != PLAIN_HEADER for h in got_headers)
    assert (marked > 100) is rig.csum_offload
    gso = sum(h[1] == VNET_GSO_TCPV4 for h in got_headers)
    assert (gso > 50) is (rig.gso_size > 0)

    rig.link_test.close()
    result = rig.wait_result()
    assert result.reason == "parent closed the link"
    assert result.link_to_tap.stats.frames == len(inbound)
    assert result.tap_to_link.stats.frames == len(outbound)
    assert result.tap_to_link.stats.dropped == result.link_to_tap.stats.dropped == 0


def test_pump_vnet_tcp_segment_gets_needs_csum_only_with_offload(vnet_rig: PumpRig) -> None:
    rig = vnet_rig
    segment = ipv4_frame(PROTO_TCP, payload=b"p" * 1000, options=b"\x01" * 8)
    rig.start()
    rig.link_test.sendall(encode_frame(rig.protocol, segment))
    [message] = receive_from_tap(rig.tap_test, 1)
    if rig.csum_offload:
        assert message[:10] == vnet_header(NEEDS_CSUM, csum_start=42, csum_offset=16)
    else:
        assert message[:10] == bytes(10)
    assert message[10:] == segment


def test_pump_vnet_tap_closed_ends_the_session(vnet_rig: PumpRig) -> None:
    rig = vnet_rig
    rig.start()
    rig.tap_test.send(PLAIN_HEADER + b"\x01" * 60)
    assert receive_from_link(rig.link_test, rig.protocol, 1) == [b"\x01" * 60]
    rig.tap_test.close()
    result = rig.wait_result()
    assert result.reason == "tap closed"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"csum_offload": True}, "virtio-net headers"),
        ({"vnet_hdr": True, "gso_size": 1460}, "needs checksum offload"),
    ],
    ids=["offload needs vnet headers", "segmentation offload needs checksum offload"],
)
def test_pump_refuses_offload_settings_that_cannot_work(
    settings: dict[str, Any], message: str
) -> None:
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link_agent, link_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with (
        tap_agent,
        tap_test,
        link_agent,
        link_test,
        pytest.raises(ValueError, match=message),
    ):
        run_pump(tap_agent.fileno(), link_agent, LinkProtocol.GVPROXY, **settings)


def pump_queued_tap_messages(
    messages: list[bytes],
    protocol: LinkProtocol = LinkProtocol.GVPROXY,
    *,
    tso: bool = False,
    max_frame: int | None = None,
) -> tuple[RecordingSender, DirectionStats, str]:
    """Run tap → link with virtio-net headers over `messages` queued in a fake TAP."""
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with tap_agent, tap_test:
        tap_test.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        tap_agent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        for message in messages:
            tap_test.send(message)
        tap_test.close()
        tap_agent.setblocking(False)
        sender = RecordingSender()
        stats = DirectionStats()
        reason = pump_tap_to_link(
            tap_agent.fileno(), sender, protocol, stats, max_frame=max_frame, vnet_hdr=True, tso=tso
        )
    return sender, stats, reason


def test_tap_to_link_vnet_drops_and_counts_gso_frames() -> None:
    good, big = b"\x0a" * 100, b"\x0b" * 3000
    gso = vnet_header(NEEDS_CSUM, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34,
                      csum_offset=16)  # fmt: skip
    sender, stats, reason = pump_queued_tap_messages(
        [PLAIN_HEADER + good, gso + big, vnet_header(gso_type=4) + good, PLAIN_HEADER + big]
    )
    assert reason == "tap closed"
    assert (stats.frames, stats.dropped, stats.bytes) == (2, 2, 3100)
    assert b"".join(sender.sends) == b"".join(
        encode_frame(LinkProtocol.GVPROXY, f) for f in (good, big)
    )


def test_tap_to_link_vnet_drops_runts_and_header_only_reads() -> None:
    sender, stats, _ = pump_queued_tap_messages(
        [PLAIN_HEADER, PLAIN_HEADER[:5], PLAIN_HEADER + b"\x01" * 13, PLAIN_HEADER + b"\x02" * 14]
    )
    assert (stats.frames, stats.dropped) == (1, 3)
    assert sender.sends == [encode_frame(LinkProtocol.GVPROXY, b"\x02" * 14)]


def test_tap_to_link_vnet_giant_frame_is_dropped_not_truncated() -> None:
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with tap_agent, tap_test:
        tap_test.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        tap_test.send(PLAIN_HEADER + b"\x03" * 1515)
        tap_test.send(PLAIN_HEADER + b"\x04" * 1514)
        tap_test.close()
        tap_agent.setblocking(False)
        sender = RecordingSender()
        stats = DirectionStats()
        pump_tap_to_link(
            tap_agent.fileno(), sender, LinkProtocol.GVPROXY, stats, max_frame=1514, vnet_hdr=True
        )
    assert (stats.frames, stats.dropped) == (1, 1)
    assert sender.sends == [encode_frame(LinkProtocol.GVPROXY, b"\x04" * 1514)]


@pytest.mark.parametrize("protocol", list(LinkProtocol), ids=lambda p: p.value)
def test_tap_to_link_vnet_still_coalesces_small_frames(protocol: LinkProtocol) -> None:
    frames = [b"\x05" * 100] * 500 + [b"\x06" * 40000] + [b"\x07" * 1500] * 30
    sender, stats, reason = pump_queued_tap_messages([PLAIN_HEADER + f for f in frames], protocol)
    assert reason == "tap closed"
    assert stats.frames == len(frames)
    assert len(sender.sends) < len(frames) // 10
    decoder = FrameDecoder(protocol)
    decoder.receive_data(b"".join(sender.sends))
    assert [bytes(f) for f in iter(decoder.maybe_next_frame, None)] == frames


def test_link_to_tap_vnet_write_errors_drop_the_frame_with_its_header() -> None:
    """A frame the TAP refuses (here: too big for the fake TAP) is dropped and counted."""
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link_agent, link_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with tap_agent, tap_test, link_agent, link_test:
        tap_agent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        small = ipv4_frame(PROTO_TCP)
        link_test.sendall(
            encode_frame(LinkProtocol.GVPROXY, b"\x01" * 60000)
            + encode_frame(LinkProtocol.GVPROXY, small)
        )
        link_test.close()
        decoder = FrameDecoder(LinkProtocol.GVPROXY)
        stats = DirectionStats()
        reason = pump_link_to_tap(
            link_agent, tap_agent.fileno(), decoder, stats, vnet_hdr=True, csum_offload=True
        )
        assert reason == "parent closed the link"
        assert (stats.frames, stats.dropped) == (1, 1)
        assert tap_test.recv(70000) == expected_header(small, True) + small


# --- segmentation offload --------------------------------------------------------------

SUPER_SEGMENT = ipv4_frame(PROTO_TCP, payload=bytes(range(256)) * 200)


def sent_frames(
    sender: RecordingSender, protocol: LinkProtocol = LinkProtocol.GVPROXY
) -> list[bytes]:
    decoder = FrameDecoder(protocol)
    decoder.receive_data(b"".join(sender.sends))
    return [bytes(f) for f in iter(decoder.maybe_next_frame, None)]


@pytest.mark.parametrize(
    ("gso_type", "passes"),
    [
        (VNET_GSO_TCPV4, True),
        (VNET_GSO_TCPV4 | VNET_GSO_ECN, True),
        (VNET_GSO_UDP, False),
        (VNET_GSO_TCPV6, False),
        (VNET_GSO_TCPV6 | VNET_GSO_ECN, False),
        (5, False),  # VIRTIO_NET_HDR_GSO_UDP_L4
    ],
    ids=["tcpv4", "tcpv4+ecn", "udp", "tcpv6", "tcpv6+ecn", "udp_l4"],
)
def test_tap_to_link_tso_passes_only_tcpv4_gso_frames(gso_type: int, passes: bool) -> None:
    good = b"\x0a" * 100
    sender, stats, reason = pump_queued_tap_messages(
        [gso_tap_header(gso_type) + SUPER_SEGMENT, PLAIN_HEADER + good], tso=True
    )
    assert reason == "tap closed"
    assert sent_frames(sender) == ([SUPER_SEGMENT, good] if passes else [good])
    assert (stats.frames, stats.dropped) == ((2, 0) if passes else (1, 1))


@pytest.mark.parametrize(
    "gso_type",
    [VNET_GSO_TCPV4, VNET_GSO_TCPV4 | VNET_GSO_ECN, VNET_GSO_UDP, VNET_GSO_TCPV6, VNET_GSO_ECN],
    ids=["tcpv4", "tcpv4+ecn", "udp", "tcpv6", "ecn"],
)
def test_tap_to_link_without_tso_drops_every_gso_frame(gso_type: int) -> None:
    good = b"\x0a" * 100
    sender, stats, _ = pump_queued_tap_messages(
        [gso_tap_header(gso_type) + SUPER_SEGMENT, PLAIN_HEADER + good]
    )
    assert sent_frames(sender) == [good]
    assert (stats.frames, stats.dropped) == (1, 1)


def test_tap_to_link_tso_still_drops_frames_beyond_its_limit() -> None:
    sender, stats, _ = pump_queued_tap_messages(
        [gso_tap_header() + SUPER_SEGMENT, PLAIN_HEADER + b"\x0c" * 1514],
        tso=True,
        max_frame=1514,
    )
    assert sent_frames(sender) == [b"\x0c" * 1514]
    assert (stats.frames, stats.dropped) == (1, 1)


def test_link_to_tap_with_gso_size_writes_gso_headers_for_super_segments() -> None:
    frames = [
        ipv4_frame(PROTO_TCP, payload=b"a" * GSO_SIZE),  # one segment: NEEDS_CSUM only
        SUPER_SEGMENT,
        ipv4_frame(PROTO_TCP, payload=b"b" * 9000, options=b"\x01" * 8, tcp_options=b"\x01" * 12),
        ipv4_frame(PROTO_UDP, payload=b"u" * 9000),  # not TCP: a zero header
        ipv4_frame(PROTO_TCP, payload=b"f" * 9000, flags_fragment=0x2000),  # a fragment: zero
    ]
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link_agent, link_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with tap_agent, tap_test, link_agent, link_test:
        tap_agent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        link_test.sendall(b"".join(encode_frame(LinkProtocol.GVPROXY, f) for f in frames))
        link_test.close()
        stats = DirectionStats()
        reason = pump_link_to_tap(
            link_agent,
            tap_agent.fileno(),
            FrameDecoder(LinkProtocol.GVPROXY),
            stats,
            vnet_hdr=True,
            csum_offload=True,
            gso_size=GSO_SIZE,
        )
        messages = receive_from_tap(tap_test, len(frames))
    assert reason == "parent closed the link"
    assert (stats.frames, stats.dropped) == (len(frames), 0)
    headers, got = split_headers(messages)
    assert got == frames
    assert headers == [
        vnet_header(NEEDS_CSUM, csum_start=34, csum_offset=16),
        vnet_header(NEEDS_CSUM, VNET_GSO_TCPV4, 54, GSO_SIZE, 34, 16),
        vnet_header(NEEDS_CSUM, VNET_GSO_TCPV4, 42 + 32, GSO_SIZE, 42, 16),
        PLAIN_HEADER,
        PLAIN_HEADER,
    ]
    assert headers == [expected_header(f, True, GSO_SIZE) for f in frames]


def test_pump_tso_lets_super_segments_past_the_mtu_both_ways(rig: PumpRig) -> None:
    """`run_pump` with a gso_size raises the TAP's frame limit to the framing's."""
    rig.vnet_hdr, rig.csum_offload, rig.gso_size, rig.max_frame = True, True, GSO_SIZE, 1514
    rig.start()
    rig.tap_test.send(gso_tap_header() + SUPER_SEGMENT)
    assert receive_from_link(rig.link_test, rig.protocol, 1) == [SUPER_SEGMENT]
    rig.link_test.sendall(encode_frame(rig.protocol, SUPER_SEGMENT))
    [message] = receive_from_tap(rig.tap_test, 1)
    assert message == vnet_header(NEEDS_CSUM, VNET_GSO_TCPV4, 54, GSO_SIZE, 34, 16) + SUPER_SEGMENT


# Syscall numbers a thread waiting in select.poll shows in /proc: poll or ppoll.
POLL_SYSCALLS = {"x86_64": {7, 271}, "aarch64": {73}}


def current_syscall(native_id: int) -> int | None:
    """The syscall thread `native_id` of this process is in, or None if it is running."""
    with open(f"/proc/self/task/{native_id}/syscall") as status:
        first = status.read().split()[0]
    return None if first == "running" else int(first)


@pytest.mark.skipif(platform.machine() not in POLL_SYSCALLS, reason="poll syscall numbers known")
def test_link_to_tap_waits_in_poll_so_the_other_directions_reads_do_not_wake_it() -> None:
    """An idle link→tap pump sleeps in poll(POLLIN), not in a blocking recv: a stream socket
    wakes every recv sleeper each time the parent reads what the other child sent, which
    cost a cross-CPU wake-up per enclave→parent frame. The link stays blocking (its file
    status flags are shared with the other child) and frames still flow after the wait."""
    link_agent, link_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    native_id: list[int] = []
    result: list[str] = []

    def run() -> None:
        native_id.append(threading.get_native_id())
        decoder = FrameDecoder(LinkProtocol.GVPROXY)
        result.append(pump_link_to_tap(link_agent, tap_agent.fileno(), decoder, DirectionStats()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        # Where it sleeps: the same syscall seen three times in a row, 10 ms apart.
        deadline = time.monotonic() + DEADLINE
        seen: list[int | None] = []
        while time.monotonic() < deadline and (
            len(seen) < 3 or len(set(seen[-3:])) != 1 or seen[-1] is None
        ):
            if native_id:
                seen.append(current_syscall(native_id[0]))
            time.sleep(0.01)
        waiting_in = seen[-1] if seen else None
        assert waiting_in in POLL_SYSCALLS[platform.machine()], f"waits in syscall {waiting_in}"
        assert link_agent.getblocking(), "the shared link descriptor was made non-blocking"
        frame = random.Random(5).randbytes(300)
        link_test.sendall(encode_frame(LinkProtocol.GVPROXY, frame))
        tap_test.settimeout(DEADLINE)
        assert tap_test.recv(MAX_TEST_FRAME) == frame
    finally:
        link_test.close()
        thread.join(DEADLINE)
        for sock in (link_agent, tap_agent, tap_test):
            sock.close()
    assert result == ["parent closed the link"]

"""The daemon's host TCP side on real loopback sockets: connect, backpressure, close."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
from ipaddress import IPv4Address

from nitro_netd.netstack.events import (
    HostEvent,
    TcpClose,
    TcpConnect,
    TcpConnected,
    TcpData,
    TcpEof,
    TcpFailed,
    TcpRelease,
    TcpSend,
    TcpWriteBlocked,
    TcpWriteUnblocked,
)
from nitro_netd.netstack.spans import HostSlice, HostSpan
from nitro_netd.parent.host_tcp import HIGH_WATER, SPLICE_AFTER, SPLICE_FLOWS, STOP_AFTER, HostTcp
from nitro_netd.parent.splice import SpliceBuffer

LOOPBACK = IPv4Address("127.0.0.1")


class Events:
    """Collects posted events; `next_of(type)` waits for one."""

    def __init__(self) -> None:
        self.all: list[HostEvent] = []
        self._arrived = asyncio.Event()

    def post(self, event: HostEvent) -> None:
        self.all.append(event)
        self._arrived.set()

    async def next_event(self) -> None:
        """Wait until another event is posted."""
        count = len(self.all)
        while len(self.all) == count:
            self._arrived.clear()
            await self._arrived.wait()

    async def wait_for(self, kind: type, limit: float = 10.0) -> HostEvent:
        async with asyncio.timeout(limit):
            while True:
                for event in self.all:
                    if isinstance(event, kind):
                        return event
                self._arrived.clear()
                await self._arrived.wait()


async def connected_flow(flow: int) -> tuple[socket.socket, HostTcp, Events, socket.socket]:
    """A host side whose `flow` connected to a loopback server: the server, the side, its
    events and the server's end of the connection."""
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    events = Events()
    side = HostTcp(loop, events.post)
    side.execute(TcpConnect(flow, LOOPBACK, server.getsockname()[1], 5.0))
    peer, _ = await loop.sock_accept(server)
    await events.wait_for(TcpConnected)
    return server, side, events, peer


async def test_host_tcp_write_blocked_then_unblocked_arrive_in_order() -> None:
    """The stack must end up "unblocked" when the shell does: both events go through the
    loop in the order they happened (an earlier mix of call_soon and direct posting could
    deliver them reversed and freeze the flow's window forever)."""
    loop = asyncio.get_running_loop()
    server, side, events, peer = await connected_flow(1)
    side.execute(TcpSend(1, (bytes(HIGH_WATER + (8 << 20)),)))
    await events.wait_for(TcpWriteBlocked)
    received = 0
    async with asyncio.timeout(20):
        while not any(isinstance(e, TcpWriteUnblocked) for e in events.all):
            received += len(await loop.sock_recv(peer, 1 << 20))
    flow_control = [e for e in events.all if isinstance(e, TcpWriteBlocked | TcpWriteUnblocked)]
    assert isinstance(flow_control[-1], TcpWriteUnblocked)
    assert received > 0
    side.execute(TcpClose(1, reset=True))
    peer.close()
    server.close()


async def test_host_tcp_connect_refused_becomes_tcp_failed_econnrefused() -> None:
    loop = asyncio.get_running_loop()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    events = Events()
    side = HostTcp(loop, events.post)
    side.execute(TcpConnect(7, LOOPBACK, port, 5.0))
    failed = await events.wait_for(TcpFailed)
    assert failed == TcpFailed(7, errno.ECONNREFUSED)
    assert side.flows == {}


async def test_host_tcp_connect_done_inside_connect_is_not_waited_for() -> None:
    """A peer on this machine (the parent's loopback) is connected by the time connect()
    returns: the flow is told at the next loop turn, with no writability watch and no
    timeout timer armed (a connection's set-up cost: crr through the bridge)."""
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", 0))
    events = Events()
    side = HostTcp(loop, events.post)
    side.execute(TcpConnect(3, LOOPBACK, server.getsockname()[1], 5.0))
    flow = side.flows[3]
    assert (flow.writing, flow.timer, events.all) == (False, None, [])
    assert await events.wait_for(TcpConnected) == TcpConnected(3)
    assert flow.reading
    side.execute(TcpClose(3, reset=True))
    server.close()


async def test_host_tcp_flow_closed_before_its_connect_is_told_stays_silent() -> None:
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", 0))
    events = Events()
    side = HostTcp(loop, events.post)
    side.execute(TcpConnect(4, LOOPBACK, server.getsockname()[1], 5.0))
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    side.execute(TcpClose(4, reset=True))  # the enclave reset it in the same batch
    for _ in range(3):
        await asyncio.sleep(0)  # loop turns (not time): the connect's callback ran
    loop.set_exception_handler(None)
    assert (events.all, errors) == ([], [])
    assert side.flows == {}
    server.close()


async def test_host_sockets_probe_a_silent_peer_with_keepalives() -> None:
    """Without keepalive a world peer that vanished held its flow, socket and the
    enclave's connection for ever; each host socket now fails about two minutes after
    its peer went quiet (TcpFailed: ETIMEDOUT, a RST to the enclave)."""
    server, side, _, peer = await connected_flow(1)
    sock = side.flows[1].sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
    interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
    count = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
    assert idle + interval * count <= 300
    side.adopt(2, peer)  # an exposed port's client gets the same
    assert peer.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    side.close_all()
    server.close()


async def test_a_bulk_flow_splices_after_a_large_read_and_its_spans_hold_the_stream() -> None:
    """With splicing allowed, the first large read (`SPLICE_AFTER`) comes as bytes and the
    rest as `HostSpan`s of a `SpliceBuffer`; taken out in order they are the stream. A
    full pipe stops reading until bytes are taken out (no spin, no stall)."""
    loop = asyncio.get_running_loop()
    server, side, events, peer = await connected_flow(1)
    side.splice_enabled, side.read_size = True, 1 << 20
    data = random.Random(1).randbytes(8 << 20)
    sender = asyncio.create_task(loop.sock_sendall(peer, data))
    sink_r, sink_w = os.pipe()
    got, done, position = bytearray(), 0, 0
    async with asyncio.timeout(30):
        while not any(isinstance(e, TcpEof) for e in events.all[:done]):
            if done == len(events.all):
                await events.next_event()
            for event in events.all[done:]:
                if isinstance(event, TcpData) and isinstance(event.data, HostSpan):
                    got += take_out(event.data.source, position, len(event.data), sink_r, sink_w)
                elif isinstance(event, TcpData) and isinstance(event.data, bytes):
                    got += event.data
                position, done = len(got), done + 1
            if sender.done() and peer.fileno() >= 0:
                peer.close()
    assert got == data
    assert side.spliced_flows == 1
    assert side.spliced_bytes > len(data) // 2
    assert side.bulk == {}  # done reading: another flow may splice now...
    assert list(side.splice_buffers) == [1]  # ...while this one's bytes are still held
    side.execute(TcpClose(1, reset=False))
    assert side.splice_buffers == {}
    server.close()
    for fd in (sink_r, sink_w):
        os.close(fd)


def take_out(buffer: SpliceBuffer, position: int, n: int, sink_r: int, sink_w: int) -> bytes:
    """What the link writer does with a span's bytes: queue and prepare them, and splice
    them out."""
    buffer.queued_slices += 1
    old, fresh = buffer.prepare(HostSlice(buffer, position, n, position)) or (b"?", -1)
    assert (old, fresh) == (None, n)
    out = bytearray()
    while len(out) < n:
        went = buffer.splice_out(sink_w, min(n - len(out), 65536))
        while went:
            chunk = os.read(sink_r, went)
            out += chunk
            went -= len(chunk)
    return bytes(out)


class FlowStreams:
    """Each flow's stream as the link writer would take it: bytes as they are, spans
    taken out of their `SpliceBuffer`."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.done = 0
        self.got: dict[int, bytearray] = {}
        self.kinds: dict[int, list[str]] = {}
        self.last_span: dict[int, tuple[SpliceBuffer, int, int]] = {}
        """Each flow's latest span: its buffer, stream position and length."""
        self._sink_r, self._sink_w = os.pipe()

    def take(self) -> None:
        for event in self.events.all[self.done :]:
            if isinstance(event, TcpData):
                got = self.got.setdefault(event.flow, bytearray())
                kinds = self.kinds.setdefault(event.flow, [])
                if isinstance(event.data, HostSpan):
                    n = len(event.data)
                    self.last_span[event.flow] = (event.data.source, len(got), n)
                    got += take_out(event.data.source, len(got), n, self._sink_r, self._sink_w)
                    kinds.append("span")
                else:
                    got += event.data
                    kinds.append("bytes")
            self.done += 1

    async def until(self, flow: int, n: int) -> None:
        """Take events until `flow` has `n` bytes."""
        async with asyncio.timeout(10):
            while len(self.got.get(flow, b"")) < n:
                if self.done == len(self.events.all):
                    await self.events.next_event()
                self.take()

    def spans(self, flow: int) -> int:
        return self.kinds.get(flow, []).count("span")

    def close(self) -> None:
        for fd in (self._sink_r, self._sink_w):
            os.close(fd)


class FakeClock:
    """The splice policy's clock, moved by hand (no test waits for `splice_idle`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def splicing_side(
    clock: FakeClock, limit: int = 1
) -> tuple[socket.socket, HostTcp, Events, socket.socket, FlowStreams]:
    """Flow 1 connected, a large download begun and splicing (`connected_flow`'s parts and
    the streams). At most `limit` bulk flows splice: one by default here, for the tests
    of what happens past the limit (the daemon's own default is far higher)."""
    loop = asyncio.get_running_loop()
    server, side, events, peer = await connected_flow(1)
    side.splice_enabled, side.read_size, side.clock = True, 1 << 20, clock
    side.splice_limit = limit
    streams = FlowStreams(events)
    await loop.sock_sendall(peer, bytes(2 << 20))
    await streams.until(1, 2 << 20)
    assert streams.spans(1) > 0
    return server, side, events, peer, streams


async def second_flow(side: HostTcp, server: socket.socket, events: Events) -> socket.socket:
    """Connect flow 2 to `server`; return the server's end."""
    loop = asyncio.get_running_loop()
    side.execute(TcpConnect(2, LOOPBACK, server.getsockname()[1], 5.0))
    peer, _ = await loop.sock_accept(server)
    async with asyncio.timeout(10):
        while TcpConnected(2) not in events.all:
            await events.next_event()
    return peer


async def send_in_rounds(peer: socket.socket, streams: FlowStreams, flow: int, n: int) -> None:
    """Send `n` more bytes from `peer` in 600 KiB rounds, each taken by the side in turn."""
    loop = asyncio.get_running_loop()
    have = len(streams.got.get(flow, b""))
    for start in range(0, n, 600 << 10):
        size = min(600 << 10, n - start)
        await loop.sock_sendall(peer, bytes(size))
        await streams.until(flow, have + start + size)


async def test_a_splicing_flow_goes_back_to_copying_for_good_when_another_turns_bulk() -> None:
    """Past the limit (one flow here): once a second flow has read `STOP_AFTER` bytes as
    bulk, the splicing one copies from its next read on, for good, and no byte of it is
    lost or reordered across the switch; the second does not splice while both are bulk.
    Once the enclave has acknowledged the first's spans its pipes are closed."""
    loop = asyncio.get_running_loop()
    clock = FakeClock()
    server, side, events, peer_a, streams = await splicing_side(clock)
    peer_b = await second_flow(side, server, events)
    await send_in_rounds(peer_b, streams, 2, STOP_AFTER + (600 << 10))
    assert side.bulk_flows() == 2
    assert streams.spans(2) == 0  # two bulk flows: it copies
    data = random.Random(2).randbytes(6 << 20)
    sender = asyncio.create_task(loop.sock_sendall(peer_a, data))
    await streams.until(1, (2 << 20) + len(data))
    await sender
    assert streams.got[1][2 << 20 :] == data
    kinds = streams.kinds[1]
    copying_again = kinds.index("bytes", kinds.index("span"))
    assert "span" not in kinds[copying_again:]
    assert side.splice_stops == 1
    assert list(side.splice_buffers) == [1]  # kept for its spans until acknowledged...
    side.execute(TcpRelease(1, len(streams.got[1])))
    assert side.splice_buffers == {}  # ...then closed
    side.execute(TcpClose(1, reset=True))
    await send_in_rounds(peer_b, streams, 2, 1200 << 10)  # now the lone download...
    assert streams.spans(2) > 0  # ...splices
    streams.close()
    side.close_all()
    for sock in (server, peer_a, peer_b):
        sock.close()


async def test_by_default_every_bulk_flow_splices() -> None:
    """Under the default limit (`SPLICE_FLOWS`) a second download splices too and the
    first keeps splicing: eight spliced streams beat eight copying ones by 11 %."""
    server, side, events, peer_a, streams = await splicing_side(FakeClock(), SPLICE_FLOWS)
    assert HostTcp(asyncio.get_running_loop(), Events().post).splice_limit == SPLICE_FLOWS
    peer_b = await second_flow(side, server, events)
    await send_in_rounds(peer_b, streams, 2, STOP_AFTER + (600 << 10))
    await send_in_rounds(peer_a, streams, 1, 1200 << 10)
    assert side.bulk_flows() == 2
    assert streams.spans(2) > 0
    assert streams.kinds[1][-1] == "span"
    assert side.splice_stops == 0
    streams.close()
    side.close_all()
    for sock in (server, peer_a, peer_b):
        sock.close()


async def test_a_short_fetch_beside_a_splicing_download_does_not_stop_it() -> None:
    """A second flow that reads less than `STOP_AFTER` as bulk (an image beside a large
    download) does not splice itself, nor end the download's splicing for good."""
    loop = asyncio.get_running_loop()
    clock = FakeClock()
    server, side, events, peer_a, streams = await splicing_side(clock)
    peer_b = await second_flow(side, server, events)
    await send_in_rounds(peer_b, streams, 2, 1200 << 10)
    assert side.bulk_flows() == 2
    spans_before = streams.spans(1)
    await loop.sock_sendall(peer_a, bytes(2 << 20))
    await streams.until(1, 4 << 20)
    assert streams.spans(1) > spans_before
    assert streams.spans(2) == 0
    assert side.splice_stops == 0
    streams.close()
    side.close_all()
    for sock in (server, peer_a, peer_b):
        sock.close()


async def test_a_bulk_flow_gone_idle_no_longer_keeps_others_from_splicing() -> None:
    """An idle keep-alive connection that once downloaded must not keep every later
    download from splicing: after `splice_idle` without a read it is no longer bulk."""
    clock = FakeClock()
    server, side, events, peer_a, streams = await splicing_side(clock)
    clock.now += side.splice_idle + 0.1
    assert side.bulk_flows() == 0
    peer_b = await second_flow(side, server, events)
    await send_in_rounds(peer_b, streams, 2, 1200 << 10)
    assert streams.spans(2) > 0
    streams.close()
    side.close_all()
    for sock in (server, peer_a, peer_b):
        sock.close()


async def test_a_splicing_flow_stays_bulk_on_small_reads_a_copying_one_does_not() -> None:
    """A splicing flow behind a slow link fills a little at a time (its pipe is full): any
    read keeps it bulk, or a second download would splice beside it; one paused for longer
    than `splice_idle` is bulk again at its next read. A copying flow's small reads (a
    chatty connection that once downloaded) do not keep it bulk."""
    loop = asyncio.get_running_loop()
    clock = FakeClock()
    server, side, events, peer_a, streams = await splicing_side(clock)
    sent = 2 << 20
    for _ in range(5):  # 1.5 s of small reads, 0.3 s apart
        clock.now += 0.3
        await loop.sock_sendall(peer_a, bytes(1000))
        sent += 1000
        await streams.until(1, sent)
    assert side.bulk_flows() == 1
    clock.now += side.splice_idle + 0.1  # paused...
    assert side.bulk_flows() == 0
    await loop.sock_sendall(peer_a, bytes(1000))  # ...and reading again
    await streams.until(1, sent + 1000)
    assert side.bulk_flows() == 1
    side.execute(TcpClose(1, reset=True))
    peer_b = await second_flow(side, server, events)
    side.splice_enabled = False  # a copying flow
    await send_in_rounds(peer_b, streams, 2, 600 << 10)
    assert side.bulk_flows() == 1
    got = len(streams.got[2])
    for _ in range(5):
        clock.now += 0.3
        await loop.sock_sendall(peer_b, bytes(1000))
        got += 1000
        await streams.until(2, got)
    assert side.bulk_flows() == 0
    streams.close()
    side.close_all()
    for sock in (server, peer_a, peer_b):
        sock.close()


async def test_a_stopped_flows_pipes_close_once_they_hold_nothing() -> None:
    """The stack says `TcpRelease` once, when the enclave has acknowledged every span:
    told while the flow still splices, the buffer is closed when the flow stops; told
    while a frame of it is still queued in the link writer, once that frame went."""
    loop = asyncio.get_running_loop()
    clock = FakeClock()
    server, side, events, peer_a, streams = await splicing_side(clock)
    side.execute(TcpRelease(1, len(streams.got[1])))  # all acknowledged, still splicing
    assert list(side.splice_buffers) == [1]
    peer_b = await second_flow(side, server, events)
    await send_in_rounds(peer_b, streams, 2, STOP_AFTER + (600 << 10))
    await loop.sock_sendall(peer_a, bytes(1000))  # its next read: it stops...
    await streams.until(1, (2 << 20) + 1000)
    assert side.splice_stops == 1
    assert side.splice_buffers == {}  # ...and holds nothing: closed at once
    streams.close()
    side.close_all()
    for sock in (server, peer_a, peer_b):
        sock.close()


async def test_a_stopped_flows_pipes_outlive_a_queued_resend_then_close() -> None:
    clock = FakeClock()
    server, side, events, peer_a, streams = await splicing_side(clock)
    peer_b = await second_flow(side, server, events)
    await send_in_rounds(peer_b, streams, 2, STOP_AFTER + (600 << 10))
    await send_in_rounds(peer_a, streams, 1, 600 << 10)  # it stops, copying from here
    assert side.splice_stops == 1
    buffer, position, n = streams.last_span[1]
    buffer.queued_slices += 1  # a resend of its last span, queued in the link writer
    side.execute(TcpRelease(1, position + n))
    assert side.splice_buffers == {1: buffer}  # the queued frame may still need it
    prepared = buffer.prepare(HostSlice(buffer, position, n, position))
    assert prepared is not None
    assert prepared[1] == 0  # (all of it sent before: served from the kept pipes)
    await asyncio.sleep(0)  # (closed just after the writer's prepare, not inside it)
    assert side.splice_buffers == {}
    assert buffer.closed
    streams.close()
    side.close_all()
    for sock in (server, peer_a, peer_b):
        sock.close()


async def test_settled_bulk_flows_are_counted_until_they_end_or_go_idle() -> None:
    """`settled` counts the bulk flows that read `STOP_AFTER`: a leak would stop every
    later download's splicing, under a limit of one, beside any short fetch."""
    loop = asyncio.get_running_loop()
    side = HostTcp(loop, Events().post)
    clock = FakeClock()
    side.clock = clock
    side.note_read(1, STOP_AFTER, splicing=False)
    side.note_read(2, SPLICE_AFTER, splicing=False)
    assert (side.bulk_flows(), side.settled) == (2, 1)
    side.forget_bulk(1)  # end of stream or closed
    side.forget_bulk(1)
    assert (side.bulk_flows(), side.settled) == (1, 0)
    side.note_read(2, STOP_AFTER, splicing=False)
    side.note_read(3, STOP_AFTER, splicing=False)
    assert side.settled == 2
    clock.now += side.splice_idle + 0.1  # both idle
    assert (side.bulk_flows(), side.settled) == (0, 0)
    side.note_read(4, STOP_AFTER, splicing=False)
    side.close_all()
    assert (side.bulk_flows(), side.settled) == (0, 0)

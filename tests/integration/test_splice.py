"""Splicing a host socket's bytes into the link: a `SpliceBuffer` fed by a real TCP socket,
frames written by the real `LinkWriter` into a real socket pair, every payload checked
against the stream it came from (new bytes, retransmissions, frames the link dropped,
pipes too small for what is in flight, a flow closed mid-frame)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import resource
import socket
import struct
import termios
from collections.abc import Callable, Iterator

import pytest

from nitro_netd.frames.errors import DropReason
from nitro_netd.link import FrameDecoder, LinkProtocol
from nitro_netd.netstack.output import Frame, SplitFrame
from nitro_netd.netstack.spans import HostSlice
from nitro_netd.parent.link_writer import LinkWriter
from nitro_netd.parent.splice import PIPE_SIZE, SpliceBuffer, available

pytestmark = pytest.mark.skipif(not available(), reason="splice/tee unavailable (not Linux)")

HEAD = struct.Struct("!QI42x")
"""A test frame's 54-byte "headers": the payload's stream position and length."""


class Stream:
    """Random bytes sent on a loopback TCP connection; `host` is the receiving socket."""

    def __init__(self, size: int) -> None:
        self.data = random.Random(size).randbytes(size)
        listener = socket.create_server(("127.0.0.1", 0))
        self.sender = socket.create_connection(listener.getsockname())
        self.host, _ = listener.accept()
        listener.close()
        self.sender.setblocking(False)
        self.host.setblocking(False)
        self.sent = 0

    def pump(self) -> None:
        """Send what the kernel takes now."""
        try:
            while self.sent < len(self.data):
                self.sent += self.sender.send(self.data[self.sent : self.sent + (1 << 20)])
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.sender.close()
        self.host.close()


@pytest.fixture
def link() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)
    theirs.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


PLAIN = (1 << 64) - 1
"""The "position" of a frame whose payload is plain bytes (a frame of another flow)."""


def frame_for(piece: HostSlice) -> SplitFrame:
    return SplitFrame(HEAD.pack(piece.position, piece.length), piece)


def plain_frame(n: int) -> Frame:
    """A frame of `n` plain payload bytes: split (as large payloads are) or whole."""
    head = HEAD.pack(PLAIN, n)
    return SplitFrame(head, plain_payload(n)) if n >= 2048 else head + plain_payload(n)


def plain_payload(n: int) -> bytes:
    return bytes([n % 251]) * n


async def read_frames(
    theirs: socket.socket,
    stream: bytes,
    seen: list[tuple[int, int]],
    *,
    chunk: int = 1 << 16,
    decoder: FrameDecoder | None = None,
) -> None:
    """Read frames for ever; check each payload against `stream`; note (position, length)."""
    loop = asyncio.get_running_loop()
    decoder = decoder or FrameDecoder(LinkProtocol.GVPROXY)
    while True:
        decoder.receive_data(await loop.sock_recv(theirs, chunk))
        while (frame := decoder.maybe_next_frame()) is not None:
            position, length = HEAD.unpack_from(frame)
            payload = bytes(frame[HEAD.size :])
            assert len(payload) == length
            if position == PLAIN:
                assert payload == plain_payload(length)
            else:
                assert payload == stream[position : position + length], f"frame at {position}"
            seen.append((position, length))


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` (letting the loop run) until it holds, for at most 30 s."""
    deadline = asyncio.get_running_loop().time() + 30
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("resend", [0.0, 0.3], ids=["no-loss", "loss"])
@pytest.mark.parametrize("pipe_size", [4096, 65536, PIPE_SIZE], ids=["1-slot", "16-slot", "1MiB"])
async def test_spliced_segments_carry_their_stream_bytes_through_resends_and_lost_frames(
    link: tuple[socket.socket, socket.socket], pipe_size: int, resend: float
) -> None:
    """A stack's pattern of segments: new bytes, acknowledgements moving on and, with
    loss, segments sent again (from the acknowledged point or later, sometimes running
    into new bytes) and frames lost (the link dropped them: the next one starts further
    on, and their bytes go again later). With one-slot pipes every tee overflows into a
    new kept pipe, and the pipes overlap."""
    buffer = SpliceBuffer(0, pipe_size=pipe_size)
    await play(link, buffer, random.Random(pipe_size), resend=resend)


async def test_spliced_and_plain_frames_keep_their_order_through_a_slow_link(
    link: tuple[socket.socket, socket.socket],
) -> None:
    """Frames of other flows (plain bytes) between spliced ones, and a reader that takes
    little at a time: the writer's pipe and the link fill up mid-frame, again and again."""
    link[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    await play(link, SpliceBuffer(0, pipe_size=65536), random.Random(7), plain=True, chunk=4096)


async def test_out_of_descriptors_spliced_frames_still_carry_their_bytes(
    link: tuple[socket.socket, socket.socket],
) -> None:
    """No descriptor for another kept pipe (the bytes in flight are copied out instead) nor
    for the writer's pipe (frames go straight into the link, in pieces): nothing is lost."""
    buffer = SpliceBuffer(0, pipe_size=4096)
    stream = Stream(4 << 20)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest_open_fd() + 1, hard))
    fillers: list[int] = []
    try:
        with contextlib.suppress(OSError):  # take the free numbers below the limit too
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        os.close(fillers.pop())  # one for the writer's own descriptor
        await play(link, buffer, random.Random(3), stream=stream)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def highest_open_fd() -> int:
    return max(int(name) for name in os.listdir("/proc/self/fd"))


async def play(
    link: tuple[socket.socket, socket.socket],
    buffer: SpliceBuffer,
    rng: random.Random,
    *,
    plain: bool = False,
    chunk: int = 1 << 15,
    stream: Stream | None = None,
    resend: float = 0.15,
) -> None:
    """Play a stack's segments of a whole stream through `buffer` and a `LinkWriter`;
    check that every frame arrives, in order, with its bytes."""
    ours, theirs = link
    loop = asyncio.get_running_loop()
    stream = stream or Stream(12 << 20)
    writer = LinkWriter(loop, ours.fileno(), LinkProtocol.GVPROXY, lambda _: None)
    sent = acked = delivered = 0
    """`delivered`: the end of what written frames cover without a gap (what a receiver
    acknowledges)."""
    expected: list[tuple[int, int]] = []
    seen: list[tuple[int, int]] = []
    reader = asyncio.create_task(read_frames(theirs, stream.data, seen, chunk=chunk))
    deadline = loop.time() + 60
    while acked < len(stream.data):
        if reader.done():
            reader.result()  # a payload check failed: show it
        assert loop.time() < deadline, f"stuck: sent {sent}, acked {acked}, {writer.queued} queued"
        if writer.queued > (4 << 20):  # the link is backed up: the daemon stops reading
            await asyncio.sleep(0.001)
            continue
        stream.pump()
        try:
            while buffer.read_pos - acked < (3 << 20):
                if not buffer.fill(stream.host.fileno(), 1 << 20):
                    break
        except BlockingIOError:
            pass
        frames = []
        for _ in range(rng.randint(1, 6)):
            roll = rng.random()
            if plain and roll > 0.7:
                n = rng.choice([10, 100, 3000, 60000])
                frames.append(plain_frame(n))
                expected.append((PLAIN, n))
                continue
            if roll < resend and sent > acked:  # a resend, maybe running into new bytes
                start = acked if roll < resend / 2 else rng.randrange(acked, sent)
                end = min(start + rng.randint(1, 65000), buffer.read_pos)
            else:
                start, end = sent, min(sent + rng.randint(1, 65000), buffer.read_pos)
            if end <= start:
                continue
            piece = HostSlice(buffer, start, end - start, acked)
            sent = max(sent, end)
            if resend and 0.6 < roll < 0.65:  # the link dropped it (its bytes go again later)
                continue
            frames.append(frame_for(piece))
            expected.append((start, end - start))
            if start <= delivered:
                delivered = max(delivered, end)
        writer.write_frames(frames)
        await asyncio.sleep(0)
        if rng.random() < 0.7:
            acked = rng.randint(acked, delivered)
    await until(lambda: len(seen) >= len(expected) or reader.done(), "every frame")
    if reader.done():
        reader.result()  # a payload check failed: show it
    reader.cancel()
    assert seen == expected
    assert writer.queued == 0
    writer.close()
    buffer.close()
    stream.close()


async def test_a_flow_closed_mid_frame_ends_that_frame_whole_and_drops_the_rest_whole(
    link: tuple[socket.socket, socket.socket],
) -> None:
    """The stack ended a flow (TcpClose) while the writer was splicing one of its frames
    into a full link: that frame's rest is read out and written (the link's framing must
    hold), its later frames are dropped before any byte of theirs is written."""
    ours, theirs = link
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    loop = asyncio.get_running_loop()
    stream = Stream(1 << 20)
    buffer = SpliceBuffer(0)
    dropped: list[DropReason] = []
    buffer.on_refused = dropped.append
    await fill_at_least(buffer, stream, 600_000)
    writer = LinkWriter(loop, ours.fileno(), LinkProtocol.GVPROXY, lambda _: None, pipe_size=4096)
    frames: list[Frame] = [frame_for(HostSlice(buffer, i * 60000, 60000, 0)) for i in range(10)]
    writer.write_frames(frames)
    assert buffer.fresh_pos < buffer.tee_pos, "the first frame should be on its way"
    buffer.close()
    seen: list[tuple[int, int]] = []
    decoder = FrameDecoder(LinkProtocol.GVPROXY)
    reader = asyncio.create_task(read_frames(theirs, stream.data, seen, decoder=decoder))
    await until(
        lambda: (writer.queued == 0 and len(seen) + len(dropped) == 10) or reader.done(),
        "every frame written or dropped",
    )
    if reader.done():
        reader.result()
    reader.cancel()
    assert (decoder.pending, unread(theirs)) == (0, 0)  # no stray bytes after them
    assert seen == [(i * 60000, 60000) for i in range(len(seen))]
    assert set(dropped) == {DropReason.FLOW_ENDED}
    writer.close()
    stream.close()


def unread(sock: socket.socket) -> int:
    """Bytes waiting in a socket's receive queue."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)))[0])


async def fill_at_least(buffer: SpliceBuffer, stream: Stream, n: int) -> None:
    """Splice at least `n` of `stream`'s bytes into `buffer`."""
    await until(lambda: _fill(buffer, stream) >= n, f"{n} bytes read")


def _fill(buffer: SpliceBuffer, stream: Stream) -> int:
    stream.pump()
    with contextlib.suppress(BlockingIOError):
        buffer.fill(stream.host.fileno(), 1 << 20)
    return buffer.read_pos


async def test_a_full_pipe_stops_reading_until_the_writer_takes_some_even_at_end_of_stream() -> (
    None
):
    """A full `fresh` pipe answers EAGAIN whatever the socket holds, its end or an error
    included (a level-triggered reader would spin at 100 % CPU): `waiting_for_room` stops
    reading, and taking bytes out (`splice_out`) calls `on_room`."""
    stream = Stream(2000)
    stream.pump()
    stream.sender.shutdown(socket.SHUT_WR)
    buffer = SpliceBuffer(0, pipe_size=4096)  # one slot: the 2000 bytes fill it
    rooms: list[None] = []
    buffer.on_room = lambda: rooms.append(None)
    await fill_at_least(buffer, stream, 2000)
    with pytest.raises(BlockingIOError):
        buffer.fill(stream.host.fileno(), 1 << 20)  # only the end is left, behind a full pipe
    assert buffer.waiting_for_room
    assert buffer.prepare(HostSlice(buffer, 0, 2000, 0)) == (None, 2000)
    sink_r, sink_w = os.pipe()
    assert buffer.splice_out(sink_w, 2000) == 2000
    assert os.read(sink_r, 4096) == stream.data
    assert rooms == [None]
    assert not buffer.waiting_for_room
    assert buffer.fill(stream.host.fileno(), 1 << 20) == 0  # the end of the stream
    for fd in (sink_r, sink_w):
        os.close(fd)
    buffer.close()
    stream.close()


@pytest.mark.parametrize("peer_closes", [False, True], ids=["open", "closed"])
async def test_urgent_data_from_the_world_neither_stalls_nor_truncates_a_spliced_stream(
    peer_closes: bool,
) -> None:
    """splice(2) stops at TCP urgent data and never passes it: EAGAIN while the world's
    socket is open (the readable socket then spun the loop), 0 once it closed (the rest
    was lost behind a false end of stream). The urgent byte is dropped, as the copying
    path's `recv` drops it, and every other byte arrives."""
    stream = Stream(0)
    stream.sender.setblocking(True)
    stream.sender.sendall(b"a" * 1000)
    stream.sender.send(b"!", socket.MSG_OOB)
    stream.sender.sendall(b"b" * 1000)
    if peer_closes:
        stream.sender.shutdown(socket.SHUT_WR)
    buffer = SpliceBuffer(0)
    ends: list[int] = []

    def read_some() -> bool:
        with contextlib.suppress(BlockingIOError):
            if not buffer.fill(stream.host.fileno(), 1 << 20):
                ends.append(buffer.read_pos)
        return buffer.read_pos >= 2000 or bool(ends)

    await until(read_some, "the bytes after the urgent one")
    assert (buffer.read_pos, ends) == (2000, [])
    assert buffer.prepare(HostSlice(buffer, 0, 2000, 0)) == (None, 2000)
    sink_r, sink_w = os.pipe()
    assert buffer.splice_out(sink_w, 2000) == 2000
    assert os.read(sink_r, 4096) == b"a" * 1000 + b"b" * 1000
    if peer_closes:
        assert buffer.fill(stream.host.fileno(), 1 << 20) == 0
    for fd in (sink_r, sink_w):
        os.close(fd)
    buffer.close()
    stream.close()


async def test_a_release_lets_go_of_every_acknowledged_byte_after_the_queued_frames(
    link: tuple[socket.socket, socket.socket],
) -> None:
    """`release` (the stack's TcpRelease: all spans acknowledged) empties the kept pipes
    at once, not in batches; while frames of the buffer wait in the link writer (a resend
    may need the bytes) it waits for them."""
    ours, theirs = link
    loop = asyncio.get_running_loop()
    stream = Stream(600_000)
    buffer = SpliceBuffer(0, pipe_size=65536)
    await fill_at_least(buffer, stream, 200_000)
    writer = LinkWriter(loop, ours.fileno(), LinkProtocol.GVPROXY, lambda _: None)
    seen: list[tuple[int, int]] = []
    reader = asyncio.create_task(read_frames(theirs, stream.data, seen))
    writer.write_frames(
        [
            frame_for(HostSlice(buffer, 0, 60_000, 0)),
            frame_for(HostSlice(buffer, 60_000, 40_000, 0)),
        ]
    )
    await until(lambda: len(seen) == 2, "the first frames")
    assert buffer.tee_pos == 100_000
    assert sum(p.end - p.start for p in buffer.kept) >= 100_000  # kept for resends
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reader.cancel()  # the link backs up: the next frames wait in the writer
    writer.write_frames([frame_for(HostSlice(buffer, 0, 60_000, 0)) for _ in range(40)])
    assert buffer.queued_slices > 0
    buffer.release(100_000)
    assert buffer.store_pos == 0  # not yet: queued resends may need the bytes
    reader = asyncio.create_task(read_frames(theirs, stream.data, seen))
    await until(lambda: len(seen) == 42, "the resends")
    assert buffer.queued_slices == 0
    assert buffer.store_pos == 100_000
    assert [(p.start, p.end) for p in buffer.kept] == [(100_000, 100_000)]
    writer.write_frames([frame_for(HostSlice(buffer, 100_000, 50_000, 100_000))])
    await until(lambda: len(seen) == 43, "a new frame")
    buffer.release(150_000)  # nothing queued: at once
    assert [(p.start, p.end) for p in buffer.kept] == [(150_000, 150_000)]
    reader.cancel()
    writer.close()
    buffer.close()
    stream.close()

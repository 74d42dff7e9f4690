"""The parent daemon's link handling over a real unix socket, with a fake enclave."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from nitro_netd.frames.icmp import IcmpType
from nitro_netd.link import (
    HEADER_OFFLOAD,
    HEADER_WANT_REPLY,
    MAX_FRAME_GVPROXY,
    OFFLOAD_CSUM,
    FrameDecoder,
    HttpHeadReader,
    LinkProtocol,
    build_connect_request,
    check_connect_reply,
    encode_frame,
)
from nitro_netd.netstack import StackConfig
from nitro_netd.parent.bridge import MAX_PENDING_LINKS, Bridge, LinkFlapping
from nitro_netd.parent.session import not_live_log
from nitro_netd.transport import tune_link_socket
from tests.support.fake_enclave import FakeEnclave
from tests.support.link_agent import running_daemon

GATEWAY = IPv4Address("192.168.127.1")
TIMEOUT = 10.0


class Agent:
    """A minimal agent speaking the link protocol from the test."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: LinkProtocol
    ) -> None:
        self.reader, self.writer, self.protocol = reader, writer, protocol
        self.decoder = FrameDecoder(protocol)

    @classmethod
    async def connect(
        cls, path: Path, protocol: LinkProtocol, *, want_reply: bool = False
    ) -> Agent:
        reader, writer = await asyncio.open_unix_connection(str(path))
        agent = cls(reader, writer, protocol)
        if protocol is LinkProtocol.GVPROXY:
            headers = {HEADER_WANT_REPLY: "1"} if want_reply else {}
            writer.write(build_connect_request(headers))
            if want_reply:
                await agent.read_reply()
        return agent

    async def read_reply(self) -> dict[str, str]:
        head_reader = HttpHeadReader()
        async with asyncio.timeout(TIMEOUT):
            while (head := head_reader.receive_data(await self.reader.read(1))) is None:
                pass
        check_connect_reply(head)
        return dict(head.headers)

    def send(self, frame: bytes) -> None:
        self.writer.write(encode_frame(self.protocol, frame))

    async def receive(self) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            while (frame := self.decoder.maybe_next_frame()) is None:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("daemon closed the link")
                self.decoder.receive_data(data)
        return bytes(frame)

    async def closed_by_daemon(self) -> bool:
        try:
            async with asyncio.timeout(TIMEOUT):
                return await self.reader.read(65536) == b""
        finally:
            self.close()

    def close(self) -> None:
        self.writer.close()


async def ping_roundtrip(agent: Agent, sequence: int = 1) -> None:
    enclave = FakeEnclave()
    agent.send(enclave.ping(GATEWAY, sequence=sequence))
    source, message = enclave.parse_icmp_reply(await agent.receive())
    assert (source, message.type, message.sequence) == (GATEWAY, IcmpType.ECHO_REPLY, sequence)


@pytest.mark.parametrize("protocol", list(LinkProtocol))
async def test_ping_gateway_over_link(tmp_path: Path, protocol: LinkProtocol) -> None:
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        agent = await Agent.connect(path, protocol)
        await ping_roundtrip(agent)
        agent.close()


def _accepted_link_sockets(path: Path) -> list[socket.socket]:
    """This process's connected unix sockets bound to `path`: dups of the in-process
    daemon's accepted link socket (its transport's and its writer's descriptors; the caller
    closes them)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue  # (the listing's own descriptor, closed by now)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)  # not a socket
            continue
        if (
            sock.family == socket.AF_UNIX
            and sock.getsockname() == str(path)
            and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        ):
            found.append(sock)
        else:
            sock.close()
    return found


@pytest.mark.parametrize("protocol", list(LinkProtocol))
async def test_accepted_unix_link_gets_the_link_socket_buffers(
    tmp_path: Path, protocol: LinkProtocol
) -> None:
    """An accepted unix socket does not inherit its listener's buffer sizes: the daemon's
    sends to the agent were capped at the system default (208 KiB) until it set them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as plain:
        default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        tune_link_socket(plain)
        tuned = plain.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if tuned <= default:
        pytest.skip("socket buffers cannot be raised here (not root, net.core.wmem_max low)")
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        agent = await Agent.connect(path, protocol)
        await ping_roundtrip(agent)  # the link is up
        accepted = _accepted_link_sockets(path)
        try:
            assert accepted
            assert {sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) for sock in accepted} == {
                tuned
            }
        finally:
            for sock in accepted:
                sock.close()
        agent.close()


async def test_silent_request_gets_no_reply_only_frames(tmp_path: Path) -> None:
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        agent = await Agent.connect(path, LinkProtocol.GVPROXY, want_reply=False)
        await ping_roundtrip(agent)  # the first bytes back decode as a frame, not HTTP
        agent.close()


async def test_reply_carries_network_plan_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(build_connect_request({HEADER_WANT_REPLY: "1"}))
        agent = Agent(reader, writer, LinkProtocol.GVPROXY)
        headers = await agent.read_reply()
        assert headers["nitro-netd-mtu"] == "65520"
        assert headers["nitro-netd-address"] == "192.168.127.2/24"
        await ping_roundtrip(agent)
        agent.close()


async def test_request_and_frames_in_one_write_are_both_used(tmp_path: Path) -> None:
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        reader, writer = await asyncio.open_unix_connection(str(path))
        enclave = FakeEnclave()
        writer.write(
            build_connect_request() + encode_frame(LinkProtocol.GVPROXY, enclave.ping(GATEWAY))
        )
        agent = Agent(reader, writer, LinkProtocol.GVPROXY)
        _, message = enclave.parse_icmp_reply(await agent.receive())
        assert message.type == IcmpType.ECHO_REPLY
        agent.close()


async def test_bad_frame_length_closes_only_that_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        bad = await Agent.connect(path, LinkProtocol.GVPROXY)
        bad.writer.write(b"\x05\x00hello")  # a 5-byte "frame": shorter than Ethernet
        assert await bad.closed_by_daemon()
        assert "invalid frame length 5" in caplog.text
        good = await Agent.connect(path, LinkProtocol.GVPROXY)
        await ping_roundtrip(good)
        good.close()


async def test_garbage_handshake_closes_link_with_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"POST /elsewhere HTTP/1.1\r\n\r\n")
        assert await Agent(reader, writer, LinkProtocol.GVPROXY).closed_by_daemon()
        assert "expected 'POST /connect HTTP/1.1'" in caplog.text


async def test_new_link_replaces_old(tmp_path: Path) -> None:
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        first = await Agent.connect(path, LinkProtocol.GVPROXY)
        await ping_roundtrip(first)
        second = await Agent.connect(path, LinkProtocol.QEMU)
        await ping_roundtrip(second, sequence=2)
        assert await first.closed_by_daemon()
        second.close()


async def test_stale_socket_file_is_replaced_and_removed_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "link.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    async with running_daemon(path):
        agent = await Agent.connect(path, LinkProtocol.GVPROXY)
        await ping_roundtrip(agent)
        agent.close()
    assert not os.path.exists(path)


async def test_checksum_offload_is_agreed_only_when_offered_with_a_reply(tmp_path: Path) -> None:
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(build_connect_request({HEADER_WANT_REPLY: "1", HEADER_OFFLOAD: OFFLOAD_CSUM}))
        offered = Agent(reader, writer, LinkProtocol.GVPROXY)
        assert (await offered.read_reply()).get(HEADER_OFFLOAD.lower()) == OFFLOAD_CSUM
        offered.close()
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(build_connect_request({HEADER_WANT_REPLY: "1"}))
        plain = Agent(reader, writer, LinkProtocol.GVPROXY)
        assert HEADER_OFFLOAD.lower() not in await plain.read_reply()
        await ping_roundtrip(plain)
        plain.close()


async def test_a_bug_while_handling_a_frame_keeps_the_link_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import nitro_netd.netstack.icmp as icmp_module

    real = icmp_module.build_echo_reply
    calls = {"n": 0}

    def buggy_once(request: Any) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated bug")
        return real(request)

    monkeypatch.setattr(icmp_module, "build_echo_reply", buggy_once)
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        agent = await Agent.connect(path, LinkProtocol.GVPROXY)
        agent.send(FakeEnclave().ping(GATEWAY, sequence=1))  # hits the bug, no reply
        await ping_roundtrip(agent, sequence=2)  # the same link still works
        agent.close()
    assert "internal error while handling a frame" in caplog.text


# --- TCP segmentation offload ------------------------------------------------------------

SMALL_MTU = 1500


async def connect_offering(path: Path, offload: str) -> tuple[Agent, dict[str, str]]:
    """Connect as an agent offering `offload`; return it and the daemon's reply headers."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(build_connect_request({HEADER_WANT_REPLY: "1", HEADER_OFFLOAD: offload}))
    agent = Agent(reader, writer, LinkProtocol.GVPROXY)
    return agent, await agent.read_reply()


def gateway_ping(frame_size: int, sequence: int) -> tuple[bytes, bytes]:
    """A ping to the gateway in a frame of `frame_size` bytes, and its data."""
    data = bytes(range(256)) * (frame_size // 256 + 1)
    data = data[: frame_size - 14 - 20 - 8]
    frame = FakeEnclave().ping(GATEWAY, sequence=sequence, data=data)
    assert len(frame) == frame_size
    return frame, data


async def test_segmentation_offload_agreed_lets_frames_up_to_the_framing_limit_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "link.sock"
    async with running_daemon(path, StackConfig(mtu=SMALL_MTU)):
        agent, reply = await connect_offering(path, "csum, tso")
        assert reply.get(HEADER_OFFLOAD.lower()) == "csum, tso"
        for sequence, size in enumerate((SMALL_MTU + 15, 20000, MAX_FRAME_GVPROXY), start=1):
            frame, data = gateway_ping(size, sequence)
            agent.send(frame)  # far more than the MTU: a TSO link takes it
            source, message = FakeEnclave().parse_icmp_reply(await agent.receive())
            assert (source, message.sequence, message.payload) == (GATEWAY, sequence, data)
        agent.close()
    assert "checksum offload on, segmentation offload on)" in caplog.text


@pytest.mark.parametrize(
    ("offer", "stack", "agreed"),
    [
        ("tso", StackConfig(mtu=SMALL_MTU), None),
        ("csum, tso", StackConfig(mtu=SMALL_MTU, segmentation_offload=False), "csum"),
        ("csum, tso", StackConfig(mtu=SMALL_MTU, checksum_offload=False), None),
        ("csum", StackConfig(mtu=SMALL_MTU), "csum"),
    ],
    ids=["tso alone", "segmentation not allowed", "checksum not allowed", "csum only"],
)
async def test_segmentation_offload_not_agreed_keeps_the_mtu_limit(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    offer: str,
    stack: StackConfig,
    agreed: str | None,
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "link.sock"
    async with running_daemon(path, stack):
        agent, reply = await connect_offering(path, offer)
        assert reply.get(HEADER_OFFLOAD.lower()) == agreed
        frame, data = gateway_ping(SMALL_MTU + 14, 1)  # the largest frame the MTU allows
        agent.send(frame)
        _, message = FakeEnclave().parse_icmp_reply(await agent.receive())
        assert message.payload == data
        agent.send(gateway_ping(SMALL_MTU + 15, 2)[0])  # one byte more
        assert await agent.closed_by_daemon()
    assert f"invalid frame length {SMALL_MTU + 15}" in caplog.text
    assert "segmentation offload off)" in caplog.text


# --- bad peers and exhausted resources -----------------------------------------------------


async def connection_sending(path: Path, first_bytes: bytes) -> Agent:
    """A connection to the daemon that has sent `first_bytes` and nothing else."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(first_bytes)
    return Agent(reader, writer, LinkProtocol.GVPROXY)


@pytest.mark.parametrize(
    "first_bytes",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00", b"\x00\x00\x00\x05"],
)
async def test_a_stray_connection_never_replaces_the_live_link(
    tmp_path: Path, first_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """An HTTP probe, a TLS hello or an impossible frame length is refused before it can
    take over (and reset) the enclave's working link."""
    caplog.set_level(logging.INFO)
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        good = await Agent.connect(path, LinkProtocol.GVPROXY)
        await ping_roundtrip(good)
        assert await (await connection_sending(path, first_bytes)).closed_by_daemon()
        assert "not an enclave link" in caplog.text
        assert "replaced by a new link" not in caplog.text
        await ping_roundtrip(good, sequence=2)
        good.close()


async def test_out_of_descriptors_fails_one_udp_flow_not_the_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import resource

    path = tmp_path / "link.sock"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with running_daemon(path):
        agent = await Agent.connect(path, LinkProtocol.GVPROXY)
        await ping_roundtrip(agent)
        enclave = FakeEnclave()
        held: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
        try:
            while True:
                try:
                    held.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    break
            agent.send(enclave.udp(IPv4Address("192.168.127.254"), 40000, 9, b"x"))
            agent.send(enclave.ping(GATEWAY, sequence=2))  # handled after the datagram
            while True:  # the flow's failure may come back first, as an ICMP error
                _, message = enclave.parse_icmp_reply(await agent.receive())
                if message.type == IcmpType.ECHO_REPLY:
                    break
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await ping_roundtrip(agent, sequence=3)
        agent.close()
    assert "cannot open a socket" in caplog.text
    assert "link broken" not in caplog.text


async def test_a_peer_gone_before_its_handshake_reply_never_replaces_the_live_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    write_failed = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "write failed" in record.getMessage():
                write_failed.set()

    logging.getLogger("nitro_netd.parent.session").addHandler(watch := Watch())
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        good = await Agent.connect(path, LinkProtocol.GVPROXY)
        await ping_roundtrip(good)
        gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        gone.connect(str(path))  # asks for a reply, and closes before the daemon reads it
        gone.sendall(build_connect_request({HEADER_WANT_REPLY: "1"}))
        gone.close()
        async with asyncio.timeout(TIMEOUT):
            await write_failed.wait()
        await ping_roundtrip(good, sequence=2)
        good.close()
    logging.getLogger("nitro_netd.parent.session").removeHandler(watch)
    assert "replaced by a new link" not in caplog.text


@pytest.fixture
def short_handshake_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's handshake timeout at 0.2 s instead of 10."""
    import nitro_netd.parent.session as session_module

    monkeypatch.setattr(session_module, "HANDSHAKE_TIMEOUT", 0.2)


@pytest.mark.parametrize("partial", [b"POS", b"POST /connect HTTP/1.1\r\n", b"\x00\x00"])
async def test_a_handshake_never_completed_is_closed_after_the_timeout(
    tmp_path: Path, partial: bytes, short_handshake_timeout: None
) -> None:
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        good = await Agent.connect(path, LinkProtocol.GVPROXY)
        await ping_roundtrip(good)
        assert await (await connection_sending(path, partial)).closed_by_daemon()
        # The good link's timer, armed first, would have fired before this one closed.
        await ping_roundtrip(good, sequence=2)
        good.close()


def test_a_link_socket_in_use_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    from nitro_netd.transport import Endpoint, Scheme, open_listener

    path = tmp_path / "link.sock"
    first = open_listener(Endpoint(Scheme.UNIX, path=str(path)))
    try:
        with pytest.raises(OSError, match=r"in use by another listener .*--listen"):
            open_listener(Endpoint(Scheme.UNIX, path=str(path)))
    finally:
        first.close()


async def test_a_quiet_qemu_agent_is_not_timed_out_before_its_first_frame(
    tmp_path: Path, short_handshake_timeout: None
) -> None:
    """The qemu framing has no request: an agent whose enclave sends nothing for a while
    has sent nothing at all, and must not be cut off for it."""
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        quiet = await Agent.connect(path, LinkProtocol.QEMU)
        begun = await connection_sending(path, b"POS")  # never finished, on a later timer
        assert await begun.closed_by_daemon()
        await ping_roundtrip(quiet)  # the quiet agent's timer, armed first, has fired too
        quiet.close()


async def test_a_handshake_begun_after_a_silence_is_timed_out_too(
    tmp_path: Path, short_handshake_timeout: None
) -> None:
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        reader, writer = await asyncio.open_unix_connection(str(path))
        silent = Agent(reader, writer, LinkProtocol.GVPROXY)
        assert await (await connection_sending(path, b"POS")).closed_by_daemon()
        writer.write(b"POS")  # the silent peer's first check has passed: it begins now
        assert await silent.closed_by_daemon()


async def test_silent_connections_are_bounded_the_oldest_goes_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A silent connection is kept (it may be a quiet qemu-framed agent), but only so many
    at once: one more closes the oldest, and a real agent still gets through."""
    caplog.set_level(logging.INFO)
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        silent = [await connection_sending(path, b"") for _ in range(MAX_PENDING_LINKS + 1)]
        assert await silent[0].closed_by_daemon()
        assert f"more than {MAX_PENDING_LINKS} connections waiting" in caplog.text
        agent = await Agent.connect(path, LinkProtocol.GVPROXY)  # evicts the next oldest
        await ping_roundtrip(agent)
        assert await silent[1].closed_by_daemon()
        agent.close()
        for connection in silent[2:]:
            connection.close()


# --- logs an outsider could flood, and links that keep replacing each other --------------


async def test_connections_that_never_become_the_link_are_logged_once_per_10_s(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A port scanner or a probe must not flood the log: one line per 10 s, then a count."""
    caplog.set_level(logging.INFO)
    now = [100.0]
    loop = asyncio.get_running_loop()
    bridge = Bridge(StackConfig(), loop)
    bridge.not_live = not_live_log(clock=lambda: now[0])
    path = tmp_path / "link.sock"
    server = await loop.create_unix_server(bridge.new_session, path=str(path))
    try:
        for probe in (
            b"GET / HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00",
            b"POST /x HTTP/1.1\r\n\r\n",
        ):
            assert await (await connection_sending(path, probe)).closed_by_daemon()
        early = await connection_sending(path, b"POS")
        early.writer.write_eof()  # closed early, mid-handshake
        assert await early.closed_by_daemon()
        now[0] += 10.0
        assert await (
            await connection_sending(path, b"GET /again HTTP/1.0\r\n\r\n")
        ).closed_by_daemon()
    finally:
        server.close()
        await server.wait_closed()
        bridge.close()
    session_lines = [r for r in caplog.records if r.name == "nitro_netd.parent.session"]
    assert [r.levelno for r in session_lines] == [logging.WARNING, logging.WARNING]
    first, second = (r.getMessage() for r in session_lines)
    assert "closed before it became the link (protocol error: not an enclave link" in first
    assert "more like it" not in first
    assert second.endswith("(3 more like it not logged)")


def test_link_flapping_is_three_replacements_in_10_s_warned_once_a_minute() -> None:
    flapping = LinkFlapping()
    assert flapping.on_replaced(now=0.0) is None
    assert flapping.on_replaced(now=5.0) is None
    assert flapping.on_replaced(now=10.0) is None, "the first one is 10 s old: two in 10 s"
    warning = flapping.on_replaced(now=11.0)
    assert warning is not None
    assert warning.startswith("link flapping: replaced 3 times in 10 s")
    for second in range(12, 71):  # one a second: flapping on, warned once a minute
        assert flapping.on_replaced(now=float(second)) is None
    assert (flapping.on_replaced(now=71.0) or "").startswith("link flapping: replaced 10 times")


async def test_two_agents_replacing_each_others_link_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    path = tmp_path / "link.sock"
    async with running_daemon(path):
        agents = []
        for sequence in range(1, 5):  # the first link, then three replacements
            agents.append(agent := await Agent.connect(path, LinkProtocol.GVPROXY))
            await ping_roundtrip(agent, sequence=sequence)
        for agent in agents:
            agent.close()
    flapping = [m for m in caplog.messages if m.startswith("link flapping")]
    assert len(flapping) == 1
    assert flapping[0].startswith("link flapping: replaced 3 times in 10 s")

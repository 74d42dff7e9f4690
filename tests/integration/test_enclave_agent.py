"""The agent's sessions against a fake parent on a unix socket, unprivileged.

A SOCK_SEQPACKET socketpair stands in for the TAP. The fake parent is driven from the test
thread; the agent runs `run_forever` in a thread and forks its pump as it would for real.
For checksum and segmentation offload the fake TAP plays an ``IFF_VNET_HDR`` TAP (10-byte
virtio-net headers both ways) and ``TUNSETOFFLOAD`` is replaced by a recorder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from nitro_netd.enclave.agent import Agent, AgentConfig
from nitro_netd.enclave.backoff import Backoff
from nitro_netd.enclave.handshake import HandshakeResult, PeerKind
from nitro_netd.enclave.tap import TUN_F_CSUM, TUN_F_TSO4
from nitro_netd.link import (
    DEFAULT_MTU,
    HEADER_MTU,
    HEADER_OFFLOAD,
    HEADER_VERSION,
    HEADER_WANT_REPLY,
    FrameDecoder,
    HttpHead,
    HttpHeadReader,
    LinkProtocol,
    build_connect_reply,
    check_connect_request,
    encode_frame,
)
from nitro_netd.transport import Endpoint, Scheme, open_listener
from tests.support.vnet_frames import (
    NEEDS_CSUM,
    PLAIN_HEADER,
    PROTO_TCP,
    PROTO_UDP,
    VNET_GSO_TCPV4,
    ipv4_frame,
    vnet_header,
)

TIMEOUT = 10.0
FRAME_A = bytes(range(60))
FRAME_B = b"\xee" * 1514


def wait_for(condition: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    """Poll `condition` until true, failing with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


class FakeParent:
    """A listening unix socket that plays the parent's side by hand."""

    def __init__(self, path: Path) -> None:
        self.endpoint = Endpoint(Scheme.UNIX, path=str(path))
        self.listener = open_listener(self.endpoint)
        self.listener.settimeout(TIMEOUT)

    def accept(self) -> socket.socket:
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        return conn

    def close(self) -> None:
        self.listener.close()


def read_request(conn: socket.socket) -> tuple[HttpHead, bytes]:
    """Read the agent's POST /connect; return its head and any bytes behind it."""
    reader = HttpHeadReader()
    while (head := reader.receive_data(conn.recv(4096))) is None:
        pass
    check_connect_request(head)
    return head, reader.rest


def read_frames(
    conn: socket.socket, protocol: LinkProtocol, count: int, already: bytes = b""
) -> list[bytes]:
    decoder = FrameDecoder(protocol)
    decoder.receive_data(already)
    frames: list[bytes] = []
    while True:
        while (frame := decoder.maybe_next_frame()) is not None:
            frames.append(bytes(frame))
        if len(frames) >= count:
            return frames
        n = conn.recv_into(decoder.get_buffer())
        assert n, "the agent closed the link"
        decoder.buffer_updated(n)


@dataclass
class AgentRig:
    agent: Agent
    tap: socket.socket
    """The test's end of the fake TAP."""
    link_ups: list[HandshakeResult]
    thread: threading.Thread
    errors: list[BaseException]


@pytest.fixture
def parent(tmp_path: Path) -> Iterator[FakeParent]:
    fake = FakeParent(tmp_path / "parent.sock")
    yield fake
    fake.close()


class FakeOffload:
    """Stands in for TUNSETOFFLOAD: records each call's flags; fails the calls listed."""

    def __init__(self, fail_calls: frozenset[int] = frozenset(), refuse_flags: int = 0) -> None:
        self.calls: list[int] = []
        self.fail_calls = fail_calls
        """0-based numbers of the calls that raise (ENOTTY, as on a non-TAP)."""
        self.refuse_flags = refuse_flags
        """Calls setting any of these flags raise EINVAL (a TAP that cannot do them)."""

    def __call__(self, fd: int, flags: int) -> None:
        self.calls.append(flags)
        if len(self.calls) - 1 in self.fail_calls:
            raise OSError(25, "Inappropriate ioctl for device")
        if flags & self.refuse_flags:
            raise OSError(22, "Invalid argument")


class FakeMtu:
    """Stands in for SIOCSIFMTU: records each MTU set; refuses them all if told to."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[int] = []
        self.refuse = refuse

    def __call__(self, fd: int, mtu: int) -> None:
        self.calls.append(mtu)
        if self.refuse:
            raise OSError(22, "Invalid argument")


def start_agent(
    endpoint: Endpoint,
    protocol: LinkProtocol,
    reply_wait: float,
    *,
    vnet_hdr: bool = False,
    set_offload: FakeOffload | None = None,
    set_mtu: FakeMtu | None = None,
    offload: bool = True,
    tso: bool = True,
    mtu: int = DEFAULT_MTU,
) -> AgentRig:
    config = AgentConfig(
        endpoint=endpoint,
        protocol=protocol,
        reply_wait=reply_wait,
        offload=offload,
        tso=tso,
        mtu=mtu,
        stable_after=0.0,
        backoff=lambda: Backoff(initial=0.01, cap=0.05),
    )
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap_test.settimeout(TIMEOUT)
    link_ups: list[HandshakeResult] = []
    agent = Agent(
        config,
        tap_agent.detach(),
        on_link_up=link_ups.append,
        vnet_hdr=vnet_hdr,
        set_offload=set_offload or FakeOffload(),
        set_mtu=set_mtu or FakeMtu(),
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            agent.run_forever()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return AgentRig(agent, tap_test, link_ups, thread, errors)


@pytest.fixture
def make_agent(parent: FakeParent) -> Iterator[Callable[..., AgentRig]]:
    rigs: list[AgentRig] = []

    def make(
        protocol: LinkProtocol = LinkProtocol.GVPROXY, reply_wait: float = 0.2, **kwargs: Any
    ) -> AgentRig:
        rig = start_agent(parent.endpoint, protocol, reply_wait, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        stop_agent(rig)
        assert rig.errors == []


def stop_agent(rig: AgentRig) -> None:
    rig.agent.stop()
    rig.thread.join(TIMEOUT)
    assert not rig.thread.is_alive(), "the agent did not stop"
    rig.agent.close()
    rig.tap.close()
    os.close(rig.agent.tap_fd)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in list(caplog.records)]


def has_message(caplog: pytest.LogCaptureFixture, prefix: str) -> Callable[[], bool]:
    return lambda: any(m.startswith(prefix) for m in messages(caplog))


@pytest.fixture(autouse=True)
def _agent_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="nitro_netd.enclave")


def test_agent_gvproxy_sends_connect_request_asking_for_reply(
    parent: FakeParent, make_agent: Callable[..., AgentRig]
) -> None:
    make_agent()
    with parent.accept() as conn:
        head, rest = read_request(conn)
    assert head.start_line == "POST /connect HTTP/1.1"
    assert head.get(HEADER_VERSION) == "1"
    assert head.get(HEADER_WANT_REPLY) == "1"
    assert rest == b""


def test_agent_gvproxy_reply_is_honoured_and_bytes_behind_it_are_frames(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_agent(reply_wait=30.0)  # a long wait: only the reply can bring the link up
    with parent.accept() as conn:
        read_request(conn)
        conn.sendall(build_connect_reply() + encode_frame(LinkProtocol.GVPROXY, FRAME_A))
        assert rig.tap.recv(70000) == FRAME_A
        rig.tap.send(FRAME_B)
        assert read_frames(conn, LinkProtocol.GVPROXY, 1) == [FRAME_B]
    assert [result.peer for result in rig.link_ups] == [PeerKind.NITRO_NETD]
    assert has_message(caplog, "link up: nitro-netd (protocol version 1) at unix://")()


def test_agent_gvproxy_silent_peer_is_taken_for_stock_gvproxy(
    parent: FakeParent, make_agent: Callable[..., AgentRig]
) -> None:
    rig = make_agent(reply_wait=0.2)
    with parent.accept() as conn:
        _, rest = read_request(conn)
        wait_for(lambda: rig.link_ups, "link up after the reply wait")
        rig.tap.send(FRAME_A)
        assert read_frames(conn, LinkProtocol.GVPROXY, 1, rest) == [FRAME_A]
        conn.sendall(encode_frame(LinkProtocol.GVPROXY, FRAME_B))
        assert rig.tap.recv(70000) == FRAME_B
    assert rig.link_ups[0].peer is PeerKind.GVPROXY


def test_agent_gvproxy_frames_instead_of_reply_go_to_the_tap(
    parent: FakeParent, make_agent: Callable[..., AgentRig]
) -> None:
    rig = make_agent(reply_wait=30.0)
    with parent.accept() as conn:
        read_request(conn)
        conn.sendall(encode_frame(LinkProtocol.GVPROXY, FRAME_A))
        assert rig.tap.recv(70000) == FRAME_A
    assert rig.link_ups[0].peer is PeerKind.GVPROXY


def test_agent_qemu_has_no_handshake(
    parent: FakeParent, make_agent: Callable[..., AgentRig]
) -> None:
    rig = make_agent(protocol=LinkProtocol.QEMU)
    with parent.accept() as conn:
        rig.tap.send(FRAME_B)
        assert read_frames(conn, LinkProtocol.QEMU, 1) == [FRAME_B]
        conn.sendall(encode_frame(LinkProtocol.QEMU, FRAME_A))
        assert rig.tap.recv(70000) == FRAME_A
    assert rig.link_ups[0].peer is PeerKind.QEMU


def test_agent_reconnects_after_parent_closes_link(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_agent()
    with parent.accept() as conn:
        read_request(conn)
        conn.sendall(build_connect_reply())
        wait_for(lambda: rig.link_ups, "first link up")
    with parent.accept() as conn:
        read_request(conn)
        conn.sendall(build_connect_reply())
        wait_for(lambda: len(rig.link_ups) == 2, "second link up")
        conn.sendall(encode_frame(LinkProtocol.GVPROXY, FRAME_A))
        assert rig.tap.recv(70000) == FRAME_A  # the same TAP serves the new session
    assert "link lost: parent closed the link" in messages(caplog)
    assert has_message(caplog, "retry in 0.01 s")()


def test_agent_bad_frame_length_ends_session_with_reason_and_reconnects(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_agent()
    with parent.accept() as conn:
        read_request(conn)
        conn.sendall(build_connect_reply() + b"\x05\x00" + b"garbage")
        with parent.accept() as second:
            read_request(second)
    wait_for(has_message(caplog, "link lost: bad frame from the parent"), "link lost log")
    lost = [m for m in messages(caplog) if m.startswith("link lost:")]
    assert "invalid frame length 5" in lost[0]
    assert len(rig.link_ups) >= 1


def test_agent_refused_reply_is_a_failed_handshake_and_retries(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_agent(reply_wait=30.0)
    with parent.accept() as conn:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        with parent.accept() as second:
            read_request(second)
    assert rig.link_ups == []
    assert has_message(caplog, "handshake failed: parent refused the link")()


def test_agent_retries_while_no_parent_listens_then_connects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "late.sock"
    rig = start_agent(Endpoint(Scheme.UNIX, path=str(path)), LinkProtocol.GVPROXY, 0.2)
    try:
        wait_for(has_message(caplog, "cannot connect to unix://"), "a connect failure")
        parent = FakeParent(path)
        with parent.accept() as conn:
            read_request(conn)
            conn.sendall(build_connect_reply())
            wait_for(lambda: rig.link_ups, "link up")
        parent.close()
    finally:
        stop_agent(rig)
    failures = [r for r in caplog.records if r.getMessage().startswith("cannot connect")]
    assert failures[0].levelno == logging.WARNING
    assert all(r.levelno == logging.DEBUG for r in failures[1:])


def test_agent_stop_during_session_is_prompt(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_agent()
    with parent.accept() as conn:
        read_request(conn)
        conn.sendall(build_connect_reply())
        wait_for(lambda: rig.link_ups, "link up")
        started = time.monotonic()
        rig.agent.stop()
        rig.thread.join(TIMEOUT)
        assert time.monotonic() - started < 3.0
        assert conn.recv(1) == b""  # the agent closed its end
    assert "link closed: agent stopping" in messages(caplog)


# --- checksum offload ------------------------------------------------------------------

TCP_SEGMENT = ipv4_frame(PROTO_TCP, payload=b"t" * 500)
UDP_DATAGRAM = ipv4_frame(PROTO_UDP, payload=b"u" * 100)
CSUM_HEADER = vnet_header(NEEDS_CSUM, csum_start=34, csum_offset=16)
OFFLOAD_REPLY = build_connect_reply({HEADER_OFFLOAD: "csum"})
PROBE = [TUN_F_CSUM, TUN_F_CSUM | TUN_F_TSO4, 0]
"""The start-up probe on a TAP that takes every offload: csum, csum with TSO4, reset."""


def offload_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in messages(caplog) if m.startswith("checksum offload")]


def exchange_vnet_frames(rig: AgentRig, conn: socket.socket, offload: bool) -> None:
    """Frames both ways through a vnet fake TAP; check the headers the agent wrote."""
    conn.sendall(encode_frame(LinkProtocol.GVPROXY, TCP_SEGMENT))
    assert rig.tap.recv(70000) == (CSUM_HEADER if offload else PLAIN_HEADER) + TCP_SEGMENT
    conn.sendall(encode_frame(LinkProtocol.GVPROXY, UDP_DATAGRAM))
    assert rig.tap.recv(70000) == PLAIN_HEADER + UDP_DATAGRAM
    rig.tap.send(CSUM_HEADER + TCP_SEGMENT)  # a partial checksum from the enclave's kernel
    assert read_frames(conn, LinkProtocol.GVPROXY, 1) == [TCP_SEGMENT]


def test_agent_offload_on_when_the_parent_agrees(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload()
    rig = make_agent(reply_wait=30.0, vnet_hdr=True, set_offload=tunsetoffload)
    assert tunsetoffload.calls == PROBE  # the start-up probe: set, then reset
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) == "csum, tso"
        conn.sendall(OFFLOAD_REPLY)  # checksum offload only
        wait_for(lambda: rig.link_ups, "link up")
        exchange_vnet_frames(rig, conn, offload=True)
    assert tunsetoffload.calls == [*PROBE, TUN_F_CSUM]
    assert rig.link_ups[0].offload is True
    assert rig.link_ups[0].tso is False
    assert rig.agent.offload is True
    assert offload_lines(caplog)[0] == "checksum offload on, segmentation offload off"


def test_agent_offload_off_when_the_parent_does_not_agree(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload()
    rig = make_agent(reply_wait=30.0, vnet_hdr=True, set_offload=tunsetoffload)
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) == "csum, tso"
        conn.sendall(build_connect_reply())
        wait_for(lambda: rig.link_ups, "link up")
        exchange_vnet_frames(rig, conn, offload=False)
    assert tunsetoffload.calls == [*PROBE, 0]
    assert rig.link_ups[0].offload is False
    assert rig.agent.offload is False
    assert offload_lines(caplog)[0] == "checksum offload off: the parent did not agree"


def test_agent_offload_off_with_a_stock_gvproxy(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload()
    rig = make_agent(reply_wait=0.2, vnet_hdr=True, set_offload=tunsetoffload)
    with parent.accept() as conn:
        head, rest = read_request(conn)
        assert head.get(HEADER_OFFLOAD) == "csum, tso"  # asked; a stock gvproxy ignores it
        wait_for(lambda: rig.link_ups, "link up after the reply wait")
        conn.sendall(encode_frame(LinkProtocol.GVPROXY, TCP_SEGMENT))
        assert rig.tap.recv(70000) == PLAIN_HEADER + TCP_SEGMENT
        rig.tap.send(PLAIN_HEADER + FRAME_B)
        assert read_frames(conn, LinkProtocol.GVPROXY, 1, rest) == [FRAME_B]
    assert tunsetoffload.calls == [*PROBE, 0]
    assert (
        offload_lines(caplog)[0] == "checksum offload off: the peer did not reply (stock gvproxy)"
    )


def test_agent_offload_reconnect_to_a_stock_peer_turns_it_off_again(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload()
    rig = make_agent(reply_wait=0.2, vnet_hdr=True, set_offload=tunsetoffload)
    with parent.accept() as conn:
        read_request(conn)
        conn.sendall(OFFLOAD_REPLY)
        wait_for(lambda: rig.link_ups, "first link up")
        exchange_vnet_frames(rig, conn, offload=True)
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) == "csum, tso"
        wait_for(lambda: len(rig.link_ups) == 2, "second link up (no reply)")
        conn.sendall(encode_frame(LinkProtocol.GVPROXY, TCP_SEGMENT))
        assert rig.tap.recv(70000) == PLAIN_HEADER + TCP_SEGMENT
    assert tunsetoffload.calls == [*PROBE, TUN_F_CSUM, 0]
    assert [r.offload for r in rig.link_ups] == [True, False]
    assert offload_lines(caplog)[:2] == [
        "checksum offload on, segmentation offload off",
        "checksum offload off: the peer did not reply (stock gvproxy)",
    ]


def test_agent_offload_not_asked_when_the_tap_refuses_tunsetoffload(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload(fail_calls=frozenset({0}))
    rig = make_agent(reply_wait=30.0, vnet_hdr=True, set_offload=tunsetoffload)
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) is None
        conn.sendall(OFFLOAD_REPLY)  # a daemon that agrees unasked is not followed
        wait_for(lambda: rig.link_ups, "link up")
        exchange_vnet_frames(rig, conn, offload=False)
    assert tunsetoffload.calls == [TUN_F_CSUM]  # never tried again
    assert rig.link_ups[0].offload is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "cannot set the TAP's offloads (TUNSETOFFLOAD: Inappropriate ioctl for device): "
        "no checksum offload"
    ]
    assert offload_lines(caplog)[0] == (
        "checksum offload off: the TAP cannot do it (TUNSETOFFLOAD failed)"
    )


def test_agent_offload_failing_to_turn_on_ends_the_session_and_stops_asking(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload(fail_calls=frozenset({3}))  # the probe works, the session's not
    rig = make_agent(reply_wait=30.0, vnet_hdr=True, set_offload=tunsetoffload)
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) == "csum, tso"
        conn.sendall(OFFLOAD_REPLY)
        assert conn.recv(1) == b""  # the agent gave this session up
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) is None
        conn.sendall(build_connect_reply())
        wait_for(lambda: rig.link_ups, "link up without offload")
        exchange_vnet_frames(rig, conn, offload=False)
    assert tunsetoffload.calls == [*PROBE, TUN_F_CSUM]
    assert [r.offload for r in rig.link_ups] == [False]
    assert has_message(caplog, "cannot turn the TAP's checksum offload on (TUNSETOFFLOAD: ")()
    assert offload_lines(caplog)[0] == (
        "checksum offload off: the TAP cannot do it (TUNSETOFFLOAD failed)"
    )


def test_agent_no_offload_never_asks_and_keeps_the_tap_off(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload()
    rig = make_agent(reply_wait=30.0, vnet_hdr=True, set_offload=tunsetoffload, offload=False)
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) is None
        conn.sendall(OFFLOAD_REPLY)
        wait_for(lambda: rig.link_ups, "link up")
        exchange_vnet_frames(rig, conn, offload=False)
    assert tunsetoffload.calls == [0, 0]
    assert offload_lines(caplog)[0] == "checksum offload off: not asked for (--no-offload)"


def test_agent_offload_off_with_the_qemu_framing(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload()
    rig = make_agent(protocol=LinkProtocol.QEMU, vnet_hdr=True, set_offload=tunsetoffload)
    with parent.accept() as conn:
        conn.sendall(encode_frame(LinkProtocol.QEMU, TCP_SEGMENT))
        assert rig.tap.recv(70000) == PLAIN_HEADER + TCP_SEGMENT
        rig.tap.send(PLAIN_HEADER + FRAME_B)
        assert read_frames(conn, LinkProtocol.QEMU, 1) == [FRAME_B]
    assert tunsetoffload.calls == [*PROBE, 0]
    assert offload_lines(caplog)[0] == "checksum offload off: qemu framing"


def test_agent_without_vnet_headers_never_asks_nor_touches_the_tap(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload()
    rig = make_agent(reply_wait=30.0, set_offload=tunsetoffload)
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) is None
        conn.sendall(OFFLOAD_REPLY + encode_frame(LinkProtocol.GVPROXY, TCP_SEGMENT))
        assert rig.tap.recv(70000) == TCP_SEGMENT
    assert tunsetoffload.calls == []
    assert rig.link_ups[0].offload is False
    assert offload_lines(caplog)[0] == "checksum offload off: the TAP has no virtio-net headers"


# --- segmentation offload --------------------------------------------------------------

TSO_MTU = 1500
SUPER_SEGMENT = ipv4_frame(PROTO_TCP, payload=b"s" * 20000)
"""A TCP/IPv4 frame far larger than `TSO_MTU`: only segmentation offload lets it through."""
GSO_HEADER = vnet_header(
    NEEDS_CSUM, VNET_GSO_TCPV4, hdr_len=54, gso_size=TSO_MTU - 40, csum_start=34, csum_offset=16
)
TSO_REPLY = build_connect_reply({HEADER_OFFLOAD: "csum, tso"})


def test_agent_segmentation_offload_on_when_the_parent_agrees(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload()
    rig = make_agent(reply_wait=30.0, vnet_hdr=True, set_offload=tunsetoffload, mtu=TSO_MTU)
    assert rig.agent.asks_for_tso is True
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) == "csum, tso"
        conn.sendall(TSO_REPLY)
        wait_for(lambda: rig.link_ups, "link up")
        exchange_vnet_frames(rig, conn, offload=True)  # MTU-sized: checksum offload only
        # Enclave-bound: the pump runs with gso_size = MTU - 40, so a super-segment from the
        # parent gets a GSO header the enclave's kernel takes as 1460-byte segments.
        conn.sendall(encode_frame(LinkProtocol.GVPROXY, SUPER_SEGMENT))
        assert rig.tap.recv(70000) == GSO_HEADER + SUPER_SEGMENT
        # Parent-bound: a super-segment from the TAP passes whatever the MTU.
        rig.tap.send(GSO_HEADER + SUPER_SEGMENT)
        assert read_frames(conn, LinkProtocol.GVPROXY, 1) == [SUPER_SEGMENT]
    assert tunsetoffload.calls == [*PROBE, TUN_F_CSUM | TUN_F_TSO4]
    assert (rig.link_ups[0].offload, rig.link_ups[0].tso) == (True, True)
    assert offload_lines(caplog)[0] == "checksum offload on, segmentation offload on"


def test_agent_segmentation_offload_not_asked_when_the_tap_refuses_tso4(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload(refuse_flags=TUN_F_TSO4)
    rig = make_agent(reply_wait=30.0, vnet_hdr=True, set_offload=tunsetoffload, mtu=TSO_MTU)
    assert tunsetoffload.calls == PROBE  # TSO4 refused; checksum offload and the reset work
    assert (rig.agent.asks_for_offload, rig.agent.asks_for_tso) == (True, False)
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) == "csum"
        conn.sendall(TSO_REPLY)  # a daemon that agrees to more than asked is not followed
        wait_for(lambda: rig.link_ups, "link up")
        exchange_vnet_frames(rig, conn, offload=True)
        conn.sendall(encode_frame(LinkProtocol.GVPROXY, SUPER_SEGMENT))
        assert rig.tap.recv(70000) == CSUM_HEADER + SUPER_SEGMENT  # no GSO header
        rig.tap.send(GSO_HEADER + SUPER_SEGMENT)  # dropped: no GSO without TSO
        rig.tap.send(PLAIN_HEADER + FRAME_B)
        assert read_frames(conn, LinkProtocol.GVPROXY, 1) == [FRAME_B]
        # (checked while the link is up: once it closes, "link lost" is a fair warning)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert tunsetoffload.calls == [*PROBE, TUN_F_CSUM]
    assert (rig.link_ups[0].offload, rig.link_ups[0].tso) == (True, False)
    assert offload_lines(caplog)[0] == "checksum offload on, segmentation offload off"
    assert has_message(caplog, "the TAP does not take offloads 0x3: Invalid argument")()


def test_agent_no_tso_asks_for_checksum_offload_only(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload()
    rig = make_agent(
        reply_wait=30.0, vnet_hdr=True, set_offload=tunsetoffload, mtu=TSO_MTU, tso=False
    )
    assert (rig.agent.asks_for_offload, rig.agent.asks_for_tso) == (True, False)
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) == "csum"
        conn.sendall(TSO_REPLY)
        wait_for(lambda: rig.link_ups, "link up")
        conn.sendall(encode_frame(LinkProtocol.GVPROXY, SUPER_SEGMENT))
        assert rig.tap.recv(70000) == CSUM_HEADER + SUPER_SEGMENT
    assert tunsetoffload.calls == [TUN_F_CSUM, 0, TUN_F_CSUM]  # TSO4 is never even tried
    assert (rig.link_ups[0].offload, rig.link_ups[0].tso) == (True, False)
    assert offload_lines(caplog)[0] == "checksum offload on, segmentation offload off"


def test_agent_segmentation_offload_is_set_again_for_every_session(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload()
    rig = make_agent(reply_wait=30.0, vnet_hdr=True, set_offload=tunsetoffload, mtu=TSO_MTU)
    with parent.accept() as conn:
        read_request(conn)
        conn.sendall(TSO_REPLY)
        wait_for(lambda: rig.link_ups, "first link up")
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) == "csum, tso"
        conn.sendall(OFFLOAD_REPLY)  # this daemon agrees to checksum offload only
        wait_for(lambda: len(rig.link_ups) == 2, "second link up")
        conn.sendall(encode_frame(LinkProtocol.GVPROXY, SUPER_SEGMENT))
        assert rig.tap.recv(70000) == CSUM_HEADER + SUPER_SEGMENT
    assert tunsetoffload.calls == [*PROBE, TUN_F_CSUM | TUN_F_TSO4, TUN_F_CSUM]
    assert [(r.offload, r.tso) for r in rig.link_ups] == [(True, True), (True, False)]
    assert offload_lines(caplog)[:2] == [
        "checksum offload on, segmentation offload on",
        "checksum offload on, segmentation offload off",
    ]


def test_agent_segmentation_offload_failing_to_turn_on_reconnects_with_checksum_offload_only(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetoffload = FakeOffload(fail_calls=frozenset({3}))  # the probe works, the session's not
    rig = make_agent(reply_wait=30.0, vnet_hdr=True, set_offload=tunsetoffload, mtu=TSO_MTU)
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) == "csum, tso"
        conn.sendall(TSO_REPLY)
        assert conn.recv(1) == b""  # the agent gave this session up
    with parent.accept() as conn:
        head, _ = read_request(conn)
        assert head.get(HEADER_OFFLOAD) == "csum"  # checksum offload is still asked for
        conn.sendall(OFFLOAD_REPLY)
        wait_for(lambda: rig.link_ups, "link up with checksum offload")
        exchange_vnet_frames(rig, conn, offload=True)
    assert tunsetoffload.calls == [*PROBE, TUN_F_CSUM | TUN_F_TSO4, TUN_F_CSUM]
    assert [(r.offload, r.tso) for r in rig.link_ups] == [(True, False)]
    assert has_message(caplog, "cannot turn the TAP's segmentation offload on (TUNSETOFFLOAD: ")()


def test_agent_a_reply_after_the_wait_ends_the_session_instead_of_corrupting_frames(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon slow to answer (paused, swapping) sends its reply after the agent took it
    for a stock gvproxy: "HT" would read as a valid length and every later frame be cut
    in the wrong place, silently. The session ends and the next one starts clean."""
    rig = make_agent(reply_wait=0.2)
    with parent.accept() as conn:
        read_request(conn)
        wait_for(lambda: rig.link_ups, "link up after the reply wait")
        conn.sendall(build_connect_reply() + encode_frame(LinkProtocol.GVPROXY, FRAME_A))
        with parent.accept() as second:
            read_request(second)
            second.sendall(build_connect_reply() + encode_frame(LinkProtocol.GVPROXY, FRAME_B))
            assert rig.tap.recv(70000) == FRAME_B  # nothing of the late session came first
    assert [result.peer for result in rig.link_ups] == [PeerKind.GVPROXY, PeerKind.NITRO_NETD]
    wait_for(has_message(caplog, "link lost: bad frame from the parent"), "link lost log")
    assert any("reply came after the agent stopped waiting" in m for m in messages(caplog))


def test_agent_a_failed_fork_is_a_failed_session_and_retries(
    parent: FakeParent,
    make_agent: Callable[..., AgentRig],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fork can fail for a moment (EAGAIN, ENOMEM in a small enclave): the agent must keep
    its promise to reconnect for ever, leaking nothing."""
    real_fork, failures = os.fork, [0]

    def flaky_fork() -> int:
        if failures[0] < 2:
            failures[0] += 1
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    monkeypatch.setattr(os, "fork", flaky_fork)  # _process forks with os.fork
    rig = make_agent()
    for session in range(3):  # two sessions cannot start their pump, the third one works
        with parent.accept() as conn:
            read_request(conn)
            conn.sendall(build_connect_reply())
            wait_for(partial(lambda n: len(rig.link_ups) > n, session), "link up")
            if session == 2:
                conn.sendall(encode_frame(LinkProtocol.GVPROXY, FRAME_A))
                assert rig.tap.recv(70000) == FRAME_A
    assert sum("cannot start the frame pump" in m for m in messages(caplog)) == 2


# --- the MTU the parent states --------------------------------------------------------

ETHERNET_1500 = b"\x5a" * (1500 + 14)
"""The largest frame a parent at MTU 1500 takes without segmentation offload."""
GIANT = b"\x5b" * (9000 + 14)
"""A frame of a TAP at a larger MTU: a parent at MTU 1500 would close the link for it."""


@contextlib.contextmanager
def link_from_a_parent_stating(
    parent: FakeParent, rig: AgentRig, mtu: str = "1500"
) -> Iterator[socket.socket]:
    """The next link of `rig`'s agent, from a parent stating `mtu`, once it is up."""
    with parent.accept() as conn:
        read_request(conn)
        conn.sendall(build_connect_reply({HEADER_MTU: mtu}))
        wait_for(lambda: rig.link_ups, "link up")
        yield conn


def mtu_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "MTU" in r.getMessage()
    ]


def test_agent_tap_takes_the_mtu_the_parent_states_and_its_own_again_for_a_stock_peer(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    """A parent at MTU 1500 and an agent at 65520: the TAP gets 1500 for that parent's
    links (a larger frame would make the parent close the link, over and over), one
    warning says so, and a stock gvproxy (no reply, no MTU) gets our own MTU again."""
    tunsetmtu = FakeMtu()
    rig = make_agent(reply_wait=0.2, set_mtu=tunsetmtu)
    for _ in range(2):  # the same parent twice: the MTU is already right, no second warning
        with link_from_a_parent_stating(parent, rig) as conn:
            # The pump reads at most the link's MTU: a giant still queued in the TAP from
            # before the change is dropped there, and the link carries on.
            rig.tap.send(GIANT)
            rig.tap.send(ETHERNET_1500)
            assert read_frames(conn, LinkProtocol.GVPROXY, 1) == [ETHERNET_1500]
            rig.link_ups.clear()
    assert tunsetmtu.calls == [1500]
    with parent.accept() as conn:  # a stock gvproxy
        _, rest = read_request(conn)
        wait_for(lambda: rig.link_ups, "link up after the reply wait")
        rig.tap.send(GIANT)
        assert read_frames(conn, LinkProtocol.GVPROXY, 1, rest) == [GIANT]
    assert tunsetmtu.calls == [1500, DEFAULT_MTU]
    assert rig.agent.mtu == DEFAULT_MTU
    assert mtu_warnings(caplog) == [
        "the parent's MTU is 1500 and ours (--mtu) 65520: the TAP uses 1500 on links to it"
    ]


def test_agent_tap_keeps_its_mtu_for_a_parent_stating_the_same(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetmtu = FakeMtu()
    rig = make_agent(reply_wait=30.0, set_mtu=tunsetmtu, mtu=1500)
    with link_from_a_parent_stating(parent, rig) as conn:
        rig.tap.send(ETHERNET_1500)
        assert read_frames(conn, LinkProtocol.GVPROXY, 1) == [ETHERNET_1500]
    assert tunsetmtu.calls == []
    assert mtu_warnings(caplog) == []


def test_agent_tap_refusing_the_parents_mtu_drops_larger_frames_and_keeps_the_link(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_agent(reply_wait=30.0, set_mtu=FakeMtu(refuse=True))
    with link_from_a_parent_stating(parent, rig) as conn:
        rig.tap.send(GIANT)
        rig.tap.send(ETHERNET_1500)
        assert read_frames(conn, LinkProtocol.GVPROXY, 1) == [ETHERNET_1500]
    assert rig.agent.mtu == DEFAULT_MTU
    assert mtu_warnings(caplog) == [
        "the parent's MTU is 1500 and ours (--mtu) 65520: the TAP uses 65520 on links to it"
        " (it refused 1500: Invalid argument; larger frames from the enclave are dropped)"
    ]


def test_agent_tap_refusing_to_go_back_below_a_parents_larger_mtu_is_warned_about(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    """An agent at 1500 gave its TAP a parent's 9000; the next parent states 1500, ours:
    a TAP that refuses to go back keeps 9000, larger than the link's, and its larger
    frames are lost. That must be a warning, not a debug line."""
    tunsetmtu = FakeMtu()
    rig = make_agent(reply_wait=30.0, set_mtu=tunsetmtu, mtu=1500)
    for stated in ("9000", "1500"):
        with link_from_a_parent_stating(parent, rig, stated):
            rig.link_ups.clear()
            tunsetmtu.refuse = True
    assert tunsetmtu.calls == [9000, 1500]
    assert rig.agent.mtu == 9000
    assert mtu_warnings(caplog)[-1] == (
        "the link's MTU is 1500, the TAP's 9000 (it refused 1500: Invalid argument; larger"
        " frames from the enclave are dropped)"
    )


def test_agent_tap_refusing_an_mtu_it_took_before_is_warned_about_again(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    """Warnings are once per message, not per stated MTU: a parent's 4000, taken, then
    refused after another parent's 9000 (its larger frames now lost), is news."""
    tunsetmtu = FakeMtu()
    rig = make_agent(reply_wait=30.0, set_mtu=tunsetmtu, mtu=1500)
    for stated in ("4000", "9000", "4000"):
        with link_from_a_parent_stating(parent, rig, stated):
            rig.link_ups.clear()
            tunsetmtu.refuse = stated == "9000"  # (from the third link on)
    assert tunsetmtu.calls == [4000, 9000, 4000]
    assert mtu_warnings(caplog)[-1] == (
        "the parent's MTU is 4000 and ours (--mtu) 1500: the TAP uses 9000 on links to it"
        " (it refused 4000: Invalid argument; larger frames from the enclave are dropped)"
    )


def test_agent_tap_keeps_its_own_mtu_when_the_parent_states_an_unusable_one(
    parent: FakeParent, make_agent: Callable[..., AgentRig], caplog: pytest.LogCaptureFixture
) -> None:
    tunsetmtu = FakeMtu()
    rig = make_agent(reply_wait=30.0, set_mtu=tunsetmtu)
    with link_from_a_parent_stating(parent, rig, "70000") as conn:
        rig.tap.send(GIANT)
        assert read_frames(conn, LinkProtocol.GVPROXY, 1) == [GIANT]
    assert tunsetmtu.calls == []
    assert mtu_warnings(caplog) == [
        "the parent states MTU '70000', outside 576..65521: the TAP uses ours, 65520"
    ]


def test_agent_segmentation_offload_cuts_at_the_mtu_the_parent_states(
    parent: FakeParent, make_agent: Callable[..., AgentRig]
) -> None:
    """With TSO the enclave's kernel cuts the daemon's super-segments at gso_size: MTU - 40
    of the link's MTU (the parent's), not of our --mtu."""
    rig = make_agent(reply_wait=30.0, vnet_hdr=True, set_mtu=FakeMtu())
    with parent.accept() as conn:
        read_request(conn)
        conn.sendall(build_connect_reply({HEADER_OFFLOAD: "csum, tso", HEADER_MTU: "1500"}))
        wait_for(lambda: rig.link_ups, "link up")
        conn.sendall(encode_frame(LinkProtocol.GVPROXY, SUPER_SEGMENT))
        assert rig.tap.recv(70000) == GSO_HEADER + SUPER_SEGMENT
    assert rig.link_ups[0].tso is True

"""The agent's sessions against a fake parent on a unix socket, unprivileged.

A SOCK_SEQPACKET socketpair stands in for the TAP. The fake parent is driven from the test
thread; the agent runs `run_forever` in a thread and forks its pump as it would for real.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nitro_netd.enclave.agent import Agent, AgentConfig
from nitro_netd.enclave.backoff import Backoff
from nitro_netd.enclave.handshake import HandshakeResult, PeerKind
from nitro_netd.link import (
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


def start_agent(endpoint: Endpoint, protocol: LinkProtocol, reply_wait: float) -> AgentRig:
    config = AgentConfig(
        endpoint=endpoint,
        protocol=protocol,
        reply_wait=reply_wait,
        stable_after=0.0,
        backoff=lambda: Backoff(initial=0.01, cap=0.05),
    )
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap_test.settimeout(TIMEOUT)
    link_ups: list[HandshakeResult] = []
    agent = Agent(config, tap_agent.detach(), on_link_up=link_ups.append)
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

    def make(protocol: LinkProtocol = LinkProtocol.GVPROXY, reply_wait: float = 0.2) -> AgentRig:
        rig = start_agent(parent.endpoint, protocol, reply_wait)
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

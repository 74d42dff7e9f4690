"""The agent's handshake decisions, fed bytes and timeouts by hand."""

from __future__ import annotations

import pytest

from nitro_netd.enclave.handshake import Handshake, PeerKind
from nitro_netd.link import (
    HttpHeadReader,
    LinkError,
    LinkProtocol,
    build_connect_reply,
    check_connect_request,
    encode_frame,
)

FRAME = encode_frame(LinkProtocol.GVPROXY, b"\xff" * 6 + b"\x5a" * 8)


def test_handshake_gvproxy_request_asks_for_a_reply() -> None:
    reader = HttpHeadReader()
    head = reader.receive_data(Handshake(LinkProtocol.GVPROXY).request())
    assert head is not None
    check_connect_request(head)
    assert head.get("Nitro-Netd-Version") == "1"
    assert head.get("Nitro-Netd-Reply") == "1"


def test_handshake_qemu_is_done_before_it_starts() -> None:
    handshake = Handshake(LinkProtocol.QEMU)
    assert handshake.request() == b""
    assert handshake.result is not None
    assert handshake.result.peer is PeerKind.QEMU


def test_handshake_gvproxy_reply_with_frames_behind_it() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY)
    result = handshake.receive_data(build_connect_reply({"Nitro-Netd-Mtu": "1500"}) + FRAME)
    assert result is not None
    assert result.peer is PeerKind.NITRO_NETD
    assert result.initial == FRAME
    assert result.reply is not None
    assert result.reply.get("Nitro-Netd-Mtu") == "1500"
    assert result.describe() == "nitro-netd (protocol version 1)"


def test_handshake_gvproxy_reply_byte_by_byte() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY)
    data = build_connect_reply() + FRAME
    results = [handshake.receive_data(data[i : i + 1]) for i in range(len(data) - len(FRAME))]
    assert all(r is None for r in results[:-1])
    assert results[-1] is not None
    assert results[-1].peer is PeerKind.NITRO_NETD
    assert results[-1].initial == b""


def test_handshake_gvproxy_silence_means_stock_gvproxy() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY)
    result = handshake.wait_expired()
    assert result is not None
    assert result.peer is PeerKind.GVPROXY
    assert result.initial == b""
    assert result.describe() == "gvproxy-compatible (no reply)"


def test_handshake_gvproxy_frames_instead_of_reply_go_at_once() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY)
    result = handshake.receive_data(FRAME)
    assert result is not None
    assert result.peer is PeerKind.GVPROXY
    assert result.initial == FRAME


def test_handshake_gvproxy_non_http_first_byte_decides_at_once() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY)
    assert handshake.receive_data(b"\x3c") is not None


def test_handshake_gvproxy_partial_reply_prefix_keeps_waiting_past_the_pause() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY)
    assert handshake.receive_data(b"HTT") is None
    assert handshake.wait_expired() is None
    result = handshake.receive_data(b"P/1.1 200 OK\r\n\r\n")
    assert result is not None
    assert result.peer is PeerKind.NITRO_NETD


def test_handshake_gvproxy_prefix_that_diverges_is_frames() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY)
    assert handshake.receive_data(b"HT") is None
    result = handshake.receive_data(b"X-and-more")
    assert result is not None
    assert result.peer is PeerKind.GVPROXY
    assert result.initial == b"HTX-and-more"


def test_handshake_gvproxy_refusal_is_a_link_error() -> None:
    with pytest.raises(LinkError, match="refused"):
        Handshake(LinkProtocol.GVPROXY).receive_data(b"HTTP/1.1 403 Forbidden\r\n\r\n")


def test_handshake_gvproxy_garbage_head_is_a_link_error() -> None:
    with pytest.raises(LinkError, match="malformed"):
        Handshake(LinkProtocol.GVPROXY).receive_data(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n")


def test_handshake_gvproxy_endless_head_is_a_link_error() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY)
    handshake.receive_data(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(LinkError, match="longer than"):
        handshake.receive_data(b"X-Pad: " + b"a" * 20000)


def test_handshake_data_after_result_is_a_bug() -> None:
    handshake = Handshake(LinkProtocol.QEMU)
    with pytest.raises(RuntimeError):
        handshake.receive_data(b"x")

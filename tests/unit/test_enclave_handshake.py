"""The agent's handshake decisions, fed bytes and timeouts by hand."""

from __future__ import annotations

import pytest

from nitro_netd.enclave.handshake import (
    OFFLOAD_REQUEST_HEADERS,
    REQUEST_HEADERS,
    TSO_REQUEST_HEADERS,
    Handshake,
    PeerKind,
    offloads_agreed,
    stated_mtu,
)
from nitro_netd.link import (
    HEADER_OFFLOAD,
    OFFLOAD_CSUM,
    OFFLOAD_TSO,
    HttpHead,
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


# --- checksum offload negotiation ------------------------------------------------------


def request_head(handshake: Handshake) -> HttpHead:
    head = HttpHeadReader().receive_data(handshake.request())
    assert head is not None
    check_connect_request(head)
    return head


def test_handshake_offload_request_carries_the_offload_header() -> None:
    request = Handshake(LinkProtocol.GVPROXY, offload=True).request()
    assert b"\r\nNitro-Netd-Offload: csum\r\n" in request
    head = request_head(Handshake(LinkProtocol.GVPROXY, offload=True))
    assert head.get(HEADER_OFFLOAD) == OFFLOAD_CSUM == "csum"
    assert head.get("Nitro-Netd-Reply") == "1"


def test_handshake_without_offload_does_not_ask() -> None:
    head = request_head(Handshake(LinkProtocol.GVPROXY))
    assert head.get(HEADER_OFFLOAD) is None
    assert b"Offload" not in Handshake(LinkProtocol.GVPROXY, offload=False).request()


def test_handshake_qemu_never_asks_and_never_has_offload() -> None:
    handshake = Handshake(LinkProtocol.QEMU, offload=True)
    assert handshake.request() == b""
    assert handshake.result is not None
    assert handshake.result.offload is False


def test_handshake_offload_on_when_the_reply_agrees() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY, offload=True)
    result = handshake.receive_data(build_connect_reply({HEADER_OFFLOAD: "csum"}) + FRAME)
    assert result is not None
    assert result.peer is PeerKind.NITRO_NETD
    assert result.offload is True
    assert result.initial == FRAME


def test_handshake_offload_off_when_the_reply_does_not_agree() -> None:
    result = Handshake(LinkProtocol.GVPROXY, offload=True).receive_data(build_connect_reply())
    assert result is not None
    assert result.peer is PeerKind.NITRO_NETD
    assert result.offload is False


def test_handshake_offload_off_when_not_asked_even_if_the_reply_says_so() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY, offload=False)
    result = handshake.receive_data(build_connect_reply({HEADER_OFFLOAD: "csum"}))
    assert result is not None
    assert result.offload is False


def test_handshake_offload_off_with_a_stock_gvproxy() -> None:
    silent = Handshake(LinkProtocol.GVPROXY, offload=True).wait_expired()
    assert silent is not None
    assert silent.offload is False
    framing = Handshake(LinkProtocol.GVPROXY, offload=True).receive_data(FRAME)
    assert framing is not None
    assert framing.offload is False


@pytest.mark.parametrize(
    ("value", "agreed"),
    [
        (None, False),
        ("", False),
        ("csum", True),
        ("CSUM", True),
        (" csum ", True),
        ("tso, csum", True),
        ("csum,tso", True),
        ("no", False),
        ("csum4", False),
        ("0", False),
    ],
)
def test_handshake_offload_decision_from_the_reply_header(value: str | None, agreed: bool) -> None:
    headers = {} if value is None else {HEADER_OFFLOAD.lower(): value}
    assert (OFFLOAD_CSUM in offloads_agreed(HttpHead("HTTP/1.1 200 OK", headers))) is agreed


def test_handshake_offload_decision_without_a_reply() -> None:
    assert OFFLOAD_CSUM not in offloads_agreed(None)


# --- segmentation offload negotiation --------------------------------------------------


def test_handshake_tso_request_asks_for_csum_and_tso() -> None:
    request = Handshake(LinkProtocol.GVPROXY, offload=True, tso=True).request()
    assert b"\r\nNitro-Netd-Offload: csum, tso\r\n" in request
    head = request_head(Handshake(LinkProtocol.GVPROXY, offload=True, tso=True))
    assert head.get(HEADER_OFFLOAD) == "csum, tso"
    assert head.get("Nitro-Netd-Reply") == "1"
    assert TSO_REQUEST_HEADERS == {**REQUEST_HEADERS, HEADER_OFFLOAD: "csum, tso"}
    assert OFFLOAD_REQUEST_HEADERS == {**REQUEST_HEADERS, HEADER_OFFLOAD: "csum"}


def test_handshake_tso_is_never_asked_without_checksum_offload() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY, offload=False, tso=True)
    assert handshake.tso is False
    assert request_head(handshake).get(HEADER_OFFLOAD) is None
    result = handshake.receive_data(build_connect_reply({HEADER_OFFLOAD: "csum, tso"}))
    assert result is not None
    assert (result.offload, result.tso) == (False, False)


def test_handshake_offload_without_tso_asks_for_csum_only() -> None:
    handshake = Handshake(LinkProtocol.GVPROXY, offload=True, tso=False)
    assert request_head(handshake).get(HEADER_OFFLOAD) == "csum"
    result = handshake.receive_data(build_connect_reply({HEADER_OFFLOAD: "csum, tso"}))
    assert result is not None
    assert (result.offload, result.tso) == (True, False)  # a daemon agreeing unasked


def test_handshake_qemu_never_has_tso() -> None:
    handshake = Handshake(LinkProtocol.QEMU, offload=True, tso=True)
    assert handshake.request() == b""
    assert handshake.result is not None
    assert (handshake.result.offload, handshake.result.tso) == (False, False)


@pytest.mark.parametrize(
    ("reply", "offload", "tso"),
    [
        ("csum, tso", True, True),
        ("tso,csum", True, True),
        ("CSUM, TSO", True, True),
        ("csum", True, False),
        ("tso", False, False),
        ("", False, False),
        (None, False, False),
    ],
)
def test_handshake_tso_result_flags_from_the_reply(
    reply: str | None, offload: bool, tso: bool
) -> None:
    headers = {} if reply is None else {HEADER_OFFLOAD: reply}
    handshake = Handshake(LinkProtocol.GVPROXY, offload=True, tso=True)
    result = handshake.receive_data(build_connect_reply(headers) + FRAME)
    assert result is not None
    assert result.peer is PeerKind.NITRO_NETD
    assert (result.offload, result.tso) == (offload, tso)
    assert result.initial == FRAME


def test_handshake_tso_off_with_a_stock_gvproxy() -> None:
    silent = Handshake(LinkProtocol.GVPROXY, offload=True, tso=True).wait_expired()
    assert silent is not None
    assert (silent.offload, silent.tso) == (False, False)


@pytest.mark.parametrize(
    ("value", "agreed"),
    [
        (None, set()),
        ("", set()),
        ("csum", {OFFLOAD_CSUM}),
        ("csum, tso", {OFFLOAD_CSUM, OFFLOAD_TSO}),
        (" TSO , Csum ,", {OFFLOAD_CSUM, OFFLOAD_TSO}),
        ("tso", set()),  # segmentation offload without checksum offload counts as nothing
        ("tso, other", set()),
        ("csum, other", {OFFLOAD_CSUM, "other"}),
    ],
)
def test_handshake_offloads_agreed_from_the_reply_header(
    value: str | None, agreed: set[str]
) -> None:
    headers = {} if value is None else {HEADER_OFFLOAD.lower(): value}
    reply = HttpHead("HTTP/1.1 200 OK", headers)
    assert offloads_agreed(reply) == frozenset(agreed)


def test_handshake_offloads_agreed_without_a_reply() -> None:
    assert offloads_agreed(None) == frozenset()


@pytest.mark.parametrize(
    ("headers", "stated"),
    [
        ({"Nitro-Netd-Mtu": "65520"}, 65520),
        ({"nitro-netd-mtu": " 1500 "}, 1500),
        ({"Nitro-Netd-Mtu": "576"}, 576),
        ({"Nitro-Netd-Mtu": "65521"}, 65521),
        ({}, None),  # a daemon that does not say
    ],
)
def test_handshake_stated_mtu_is_read_from_the_reply(
    headers: dict[str, str], stated: int | None
) -> None:
    """The daemon states its MTU in the reply; the agent gives its TAP that MTU."""
    result = Handshake(LinkProtocol.GVPROXY).receive_data(build_connect_reply(headers))
    assert result is not None
    assert stated_mtu(result.reply) == stated


def test_handshake_stated_mtu_without_a_reply_is_none() -> None:
    assert stated_mtu(None) is None


@pytest.mark.parametrize(
    "value", ["575", "65522", "1500.0", "-1500", "big", "", "\u0661\u0665\u0660\u0660", "9" * 5000]
)
def test_handshake_stated_mtu_the_link_cannot_carry_is_a_link_error(value: str) -> None:
    """Anything else is a `LinkError` (the agent then keeps its own MTU): also non-ASCII
    digits, and thousands of digits, which `int()` refuses with a ValueError that would
    have ended the agent."""
    reply = HttpHead("HTTP/1.1 200 OK", {"nitro-netd-mtu": value})
    with pytest.raises(LinkError, match=r"outside 576\.\.65521"):
        stated_mtu(reply)

"""The minimal DNS codec: header and question parsing, SERVFAIL and local answers."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.netstack import StackConfig
from nitro_netd.netstack.dns import (
    DnsQuestion,
    RCode,
    RRType,
    build_local_answer,
    build_query,
    build_servfail,
    dns_upstream_for_tcp,
    is_local_name,
    parse_header,
    parse_name,
    parse_query,
)

ALIAS = IPv4Address("192.168.127.254")

labels = st.lists(st.binary(min_size=1, max_size=63), min_size=0, max_size=3).map(tuple)
questions = st.builds(DnsQuestion, labels, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))


def question(name: str, qtype: int = RRType.A) -> DnsQuestion:
    return DnsQuestion(tuple(label.encode() for label in name.split(".")), qtype, 1)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_either_parse_or_raise_frame_error(data: bytes) -> None:
    try:
        query = parse_query(data)
    except FrameError:
        return
    assert sum(len(label) + 1 for label in query.question.labels) + 1 <= 255


@settings(max_examples=300)
@given(st.binary(min_size=12, max_size=12), st.binary(max_size=200))
def test_arbitrary_question_bytes_after_a_header_parse_or_raise(head: bytes, rest: bytes) -> None:
    data = head[:4] + b"\x00\x01" + head[6:] + rest  # qdcount 1: always reach the question
    try:
        parse_query(data)
    except FrameError as exc:
        reason = exc.reason
    else:
        return
    assert reason in (DropReason.TRUNCATED, DropReason.BAD_HEADER)


@given(st.integers(0, 0xFFFF), questions)
def test_query_round_trip(ident: int, asked: DnsQuestion) -> None:
    query = parse_query(build_query(ident, asked))
    assert query.header.id == ident
    assert not query.header.is_response
    assert query.question == asked


@given(st.integers(0, 0xFFFF), questions)
def test_servfail_keeps_id_and_question(ident: int, asked: DnsQuestion) -> None:
    answer = parse_query(build_servfail(parse_query(build_query(ident, asked))))
    assert answer.header.id == ident
    assert answer.header.is_response
    assert answer.header.rcode == RCode.SERVFAIL
    assert (answer.header.qdcount, answer.header.ancount) == (1, 0)
    assert answer.question == asked


def test_local_a_answer_carries_the_alias() -> None:
    query = parse_query(build_query(0x1234, question("host.docker.internal")))
    data = build_local_answer(query, ALIAS)
    header = parse_header(data)
    assert (header.id, header.rcode, header.ancount) == (0x1234, RCode.NOERROR, 1)
    assert header.flags & 0x0400  # authoritative
    rtype, rclass, ttl, rdlength = struct.unpack("!HHIH", data[-14:-4])
    assert (rtype, rclass, rdlength) == (RRType.A, 1, 4)
    assert ttl > 0
    assert data[-16:-14] == b"\xc0\x0c"  # the name points at the question
    assert data[-4:] == ALIAS.packed


@pytest.mark.parametrize("qtype", [RRType.AAAA, 15, 16])
def test_local_answer_for_other_types_is_noerror_without_records(qtype: int) -> None:
    query = parse_query(build_query(7, question("host.containers.internal", qtype)))
    header = parse_header(build_local_answer(query, ALIAS))
    assert (header.rcode, header.ancount) == (RCode.NOERROR, 0)


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("host.docker.internal", True),
        ("HOST.Docker.Internal", True),
        ("host.containers.internal", True),
        ("docker.internal", False),
        ("host.docker.internal.example", False),
        ("example.com", False),
    ],
)
def test_local_names_are_case_insensitive(name: str, local: bool) -> None:
    assert is_local_name(StackConfig(), question(name)) is local


def test_configured_host_names_may_have_a_trailing_dot() -> None:
    config = StackConfig(host_names=("Parent.Internal.",))
    assert is_local_name(config, question("parent.internal"))


def test_compression_pointer_is_followed() -> None:
    data = b"\x00" * 12 + b"\x07example\x03com\x00" + b"\xc0\x0c"
    assert parse_name(data, 25) == ((b"example", b"com"), 27)


def test_compression_pointer_loop_is_refused() -> None:
    data = b"\x00" * 12 + b"\xc0\x0c"
    with pytest.raises(FrameError, match="pointer loop"):
        parse_name(data, 12)


def test_name_over_255_bytes_is_refused() -> None:
    data = b"\x00" * 12 + (b"\x3f" + b"a" * 63) * 4 + b"\x00"
    with pytest.raises(FrameError, match="over 255"):
        parse_name(data, 12)


def test_message_without_question_is_refused() -> None:
    with pytest.raises(FrameError, match="without a question"):
        parse_query(bytes(12))


def test_tcp_upstream_is_the_first_resolver_or_none() -> None:
    assert dns_upstream_for_tcp(StackConfig()) is None
    servers = (IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3"))
    assert dns_upstream_for_tcp(StackConfig(dns_servers=servers)) == servers[0]

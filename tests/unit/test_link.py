"""The link protocol: length-prefixed framing both ways, and the HTTP handshake."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.link import (
    HEADER_OFFLOAD,
    HEADER_VERSION,
    HEADER_WANT_REPLY,
    MAX_FRAME_GVPROXY,
    MAX_FRAME_QEMU,
    MAX_HANDSHAKE,
    MIN_FRAME,
    OFFLOAD_CSUM,
    OFFLOAD_TSO,
    PROTOCOL_VERSION,
    FrameDecoder,
    HttpHead,
    HttpHeadReader,
    LinkError,
    LinkProtocol,
    build_connect_reply,
    build_connect_request,
    check_connect_reply,
    check_connect_request,
    detect_protocol,
    encode_frame,
    format_offloads,
    pack_length,
    parse_offloads,
)

protocols = st.sampled_from(LinkProtocol)
frame_lists = st.lists(st.binary(min_size=MIN_FRAME, max_size=300), max_size=20)

# What gvisor-tap-vsock's agent writes: Go's net/http `req.Write(conn)` for POST /connect.
GO_CONNECT_REQUEST = (
    b"POST /connect HTTP/1.1\r\n"
    b"Host: 192.168.127.1\r\n"
    b"User-Agent: Go-http-client/1.1\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def encode_all(protocol: LinkProtocol, frames: list[bytes]) -> bytes:
    return b"".join(encode_frame(protocol, f) for f in frames)


def drain(decoder: FrameDecoder) -> list[bytes]:
    """Every whole frame available now, copied (the views die at the next receive)."""
    out = []
    while (frame := decoder.maybe_next_frame()) is not None:
        out.append(bytes(frame))
    return out


def next_frame(decoder: FrameDecoder) -> bytes | None:
    frame = decoder.maybe_next_frame()
    return None if frame is None else bytes(frame)


def small_decoder(protocol: LinkProtocol) -> FrameDecoder:
    """A decoder whose buffer is as small as allowed, so it compacts often."""
    return FrameDecoder(protocol, max_frame=300, capacity=0)


def feed_through_buffer(decoder: FrameDecoder, data: bytes) -> list[bytes]:
    """Feed as a BufferedProtocol would: fill `get_buffer()`, then `buffer_updated`."""
    frames: list[bytes] = []
    while data:
        free = decoder.get_buffer()
        assert len(free) > 0
        n = min(len(free), len(data))
        free[:n] = data[:n]
        decoder.buffer_updated(n)
        data = data[n:]
        frames += drain(decoder)
    return frames


# --- framing -------------------------------------------------------------------------


def test_encode_frame_prefixes() -> None:
    frame = bytes(range(20))
    assert encode_frame(LinkProtocol.GVPROXY, frame) == b"\x14\x00" + frame
    assert encode_frame(LinkProtocol.QEMU, bytearray(frame)) == b"\x00\x00\x00\x14" + frame


@pytest.mark.parametrize("protocol", list(LinkProtocol))
def test_encode_frame_bounds(protocol: LinkProtocol) -> None:
    for n in (MIN_FRAME, protocol.max_frame):
        assert len(encode_frame(protocol, bytes(n))) == protocol.header_size + n
    for n in (0, MIN_FRAME - 1, protocol.max_frame + 1):
        with pytest.raises(ValueError, match=f"frame of {n} bytes outside"):
            encode_frame(protocol, bytes(n))


@pytest.mark.parametrize("protocol", list(LinkProtocol))
def test_pack_length_matches_encode_frame(protocol: LinkProtocol) -> None:
    frame = b"f" * 100
    buffer = bytearray(protocol.header_size + 2)
    pack_length(protocol, buffer, 2, len(frame))
    assert bytes(buffer[2:]) == encode_frame(protocol, frame)[: protocol.header_size]


@given(protocol=protocols, frames=frame_lists)
def test_link_stream_fed_whole(protocol: LinkProtocol, frames: list[bytes]) -> None:
    decoder = FrameDecoder(protocol)
    decoder.receive_data(encode_all(protocol, frames))
    assert drain(decoder) == frames
    assert decoder.pending == 0


@settings(max_examples=50)
@given(protocol=protocols, frames=frame_lists)
def test_link_stream_fed_one_byte_at_a_time(protocol: LinkProtocol, frames: list[bytes]) -> None:
    decoder = small_decoder(protocol)
    got: list[bytes] = []
    for byte in encode_all(protocol, frames):
        decoder.receive_data(bytes([byte]))
        got += drain(decoder)
    assert got == frames
    assert decoder.pending == 0


@given(protocol=protocols, frames=frame_lists, data=st.data())
def test_link_stream_fed_in_random_chunks(
    protocol: LinkProtocol, frames: list[bytes], data: st.DataObject
) -> None:
    stream = encode_all(protocol, frames)
    decoder = small_decoder(protocol)
    got: list[bytes] = []
    while stream:
        n = data.draw(st.integers(1, len(stream)))
        decoder.receive_data(stream[:n])
        stream = stream[n:]
        got += drain(decoder)
    assert got == frames


@given(protocol=protocols, frames=frame_lists, data=st.data())
def test_link_stream_through_get_buffer(
    protocol: LinkProtocol, frames: list[bytes], data: st.DataObject
) -> None:
    stream = encode_all(protocol, frames)
    decoder = small_decoder(protocol)
    got: list[bytes] = []
    while stream:
        free = decoder.get_buffer()
        assert len(free) >= decoder.max_frame + protocol.header_size - decoder.pending
        n = data.draw(st.integers(1, min(len(free), len(stream))))
        free[:n] = stream[:n]
        decoder.buffer_updated(n)
        stream = stream[n:]
        got += drain(decoder)
    assert got == frames


@pytest.mark.parametrize("protocol", list(LinkProtocol))
def test_link_largest_frames(protocol: LinkProtocol) -> None:
    frames = [bytes([i]) * protocol.max_frame for i in range(3)] + [b"m" * MIN_FRAME]
    stream = encode_all(protocol, frames)
    assert feed_through_buffer(FrameDecoder(protocol, capacity=0), stream) == frames
    whole = FrameDecoder(protocol, capacity=0)
    whole.receive_data(stream)
    assert drain(whole) == frames


@pytest.mark.parametrize("protocol", list(LinkProtocol))
def test_link_receive_data_larger_than_the_buffer(protocol: LinkProtocol) -> None:
    # receive_data takes "any amount", even more than the buffer holds undrained.
    frames = [bytes([i % 256]) * 60000 for i in range(40)]
    decoder = FrameDecoder(protocol)
    decoder.receive_data(b"")
    decoder.receive_data(encode_all(protocol, frames[:1])[:5])
    decoder.receive_data(encode_all(protocol, frames)[5:] + encode_all(protocol, frames[1:]))
    assert drain(decoder) == frames + frames[1:]


@pytest.mark.parametrize("protocol", list(LinkProtocol))
def test_link_frame_is_a_view_until_the_next_receive(protocol: LinkProtocol) -> None:
    decoder = FrameDecoder(protocol)
    decoder.receive_data(encode_frame(protocol, b"a" * 20))
    frame = decoder.maybe_next_frame()
    assert isinstance(frame, memoryview)
    assert frame == b"a" * 20
    assert decoder.maybe_next_frame() is None


def _prefix(protocol: LinkProtocol, length: int) -> bytes:
    return struct.pack("<H" if protocol is LinkProtocol.GVPROXY else ">I", length)


@pytest.mark.parametrize(
    ("protocol", "length", "maximum"),
    [
        (LinkProtocol.GVPROXY, 0, MAX_FRAME_GVPROXY),
        (LinkProtocol.GVPROXY, MIN_FRAME - 1, MAX_FRAME_GVPROXY),
        (LinkProtocol.QEMU, 0, MAX_FRAME_QEMU),
        (LinkProtocol.QEMU, MIN_FRAME - 1, MAX_FRAME_QEMU),
        (LinkProtocol.QEMU, MAX_FRAME_QEMU + 1, MAX_FRAME_QEMU),
        (LinkProtocol.QEMU, 0xFFFFFFFF, MAX_FRAME_QEMU),
    ],
)
def test_link_bad_length(protocol: LinkProtocol, length: int, maximum: int) -> None:
    decoder = FrameDecoder(protocol)
    decoder.receive_data(encode_frame(protocol, b"g" * 20) + _prefix(protocol, length))
    assert next_frame(decoder) == b"g" * 20
    with pytest.raises(LinkError) as info:
        decoder.maybe_next_frame()
    assert str(info.value) == f"invalid frame length {length}: outside {MIN_FRAME}..{maximum}"


@pytest.mark.parametrize("protocol", list(LinkProtocol))
def test_link_configured_max_frame(protocol: LinkProtocol) -> None:
    decoder = FrameDecoder(protocol, max_frame=1514)
    decoder.receive_data(encode_frame(protocol, bytes(1514)) + _prefix(protocol, 1515))
    assert next_frame(decoder) == bytes(1514)
    with pytest.raises(LinkError, match=r"invalid frame length 1515: outside 14\.\.1514"):
        decoder.maybe_next_frame()


def test_link_max_frame_capped_by_the_framing() -> None:
    assert FrameDecoder(LinkProtocol.GVPROXY, max_frame=100_000).max_frame == MAX_FRAME_GVPROXY
    assert FrameDecoder(LinkProtocol.QEMU).max_frame == MAX_FRAME_QEMU


@pytest.mark.parametrize("protocol", list(LinkProtocol))
def test_link_take_pending(protocol: LinkProtocol) -> None:
    first, second = b"1" * 30, b"2" * 40
    stream = encode_frame(protocol, first) + encode_frame(protocol, second)
    decoder = FrameDecoder(protocol)
    decoder.receive_data(stream[:-10])
    assert drain(decoder) == [first]
    assert decoder.pending == protocol.header_size + 30
    assert decoder.take_pending() == stream[len(first) + protocol.header_size : -10]
    assert decoder.pending == 0
    assert decoder.take_pending() == b""
    decoder.receive_data(stream)
    assert drain(decoder) == [first, second]


def _outcome(decoder: FrameDecoder, chunks: list[bytes]) -> tuple[list[bytes], bool]:
    """Feed chunks; return the frames and whether a length's LinkError ended the stream."""
    frames: list[bytes] = []
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
            frames += drain(decoder)
    except LinkError as exc:
        return frames, str(exc).startswith("invalid frame length")
    return frames, False


@settings(max_examples=300)
@given(protocol=protocols, data=st.binary(max_size=400))
def test_link_arbitrary_bytes_yield_frames_or_link_error(
    protocol: LinkProtocol, data: bytes
) -> None:
    whole = _outcome(FrameDecoder(protocol, max_frame=300), [data])
    bytewise = _outcome(small_decoder(protocol), [data[i : i + 1] for i in range(len(data))])
    assert whole == bytewise
    frames, _ = whole
    assert all(MIN_FRAME <= len(f) <= 300 for f in frames)
    assert sum(len(f) + protocol.header_size for f in frames) <= len(data)


# --- protocol detection --------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (b"", None),
        (b"P", None),
        (b"POS", None),
        (b"POST", LinkProtocol.GVPROXY),
        (GO_CONNECT_REQUEST, LinkProtocol.GVPROXY),
        (b"\x00", None),
        (b"\x00\x00\x05", None),
        (b"\x00\x00\x05\xea", LinkProtocol.QEMU),
    ],
)
def test_detect_protocol(first: bytes, expected: LinkProtocol | None) -> None:
    assert detect_protocol(first) is expected


@pytest.mark.parametrize(
    "first",
    [b"PX", b"GET ", b"\x16\x03\x01", b"\x00\x01\x00\x0f", b"\x00\x00\x00\x0d"],
)
def test_detect_protocol_refuses_what_is_neither_framing(first: bytes) -> None:
    """Not POST, and not a 32-bit length of a possible frame: an HTTP probe, a TLS hello,
    a runt or an oversized first frame is not an agent."""
    with pytest.raises(LinkError, match="not an enclave link"):
        detect_protocol(first)


@given(frame=st.binary(min_size=MIN_FRAME, max_size=100))
def test_detect_protocol_qemu_frame(frame: bytes) -> None:
    stream = encode_frame(LinkProtocol.QEMU, frame)
    assert all(detect_protocol(stream[:n]) is None for n in range(1, 4))
    assert detect_protocol(stream[:4]) is LinkProtocol.QEMU


@given(first=st.binary(min_size=4, max_size=8))
def test_detect_protocol_never_guesses(first: bytes) -> None:
    """Any first bytes give a framing whose first frame is possible, or a clear error."""
    try:
        protocol = detect_protocol(first)
    except LinkError:
        return
    if protocol is LinkProtocol.QEMU:
        assert MIN_FRAME <= int.from_bytes(first[:4]) <= LinkProtocol.QEMU.max_frame
    else:
        assert first.startswith(b"POST")


def test_detect_protocol_connect_request_prefixes() -> None:
    request = build_connect_request()
    for n in range(len(request)):
        assert detect_protocol(request[:n]) is (LinkProtocol.GVPROXY if n >= 4 else None)


# --- the HTTP handshake --------------------------------------------------------------


def read_head(data: bytes) -> tuple[HttpHead, bytes]:
    reader = HttpHeadReader()
    head = reader.receive_data(data)
    assert head is not None
    return head, reader.rest


def test_connect_request_round_trip() -> None:
    request = build_connect_request({HEADER_WANT_REPLY: "1", "Nitro-Netd-Enclave": "16"})
    head, rest = read_head(request)
    check_connect_request(head)
    assert rest == b""
    assert head.start_line == "POST /connect HTTP/1.1"
    assert head.get("content-length") == "0"
    assert head.get("NITRO-NETD-REPLY") == "1"
    assert head.get(HEADER_WANT_REPLY.lower()) == "1"
    assert head.get("nitro-netd-enclave") == "16"
    assert head.get("absent") is None


def test_connect_request_fed_one_byte_at_a_time() -> None:
    request = build_connect_request()
    reader = HttpHeadReader()
    for byte in request[:-1]:
        assert reader.receive_data(bytes([byte])) is None
    head = reader.receive_data(request[-1:])
    assert head is not None
    check_connect_request(head)
    assert reader.rest == b""


@pytest.mark.parametrize("split", [1, 30, 97, 98, 99, 10_000])
def test_go_connect_request_followed_by_frames(split: int) -> None:
    frames = [b"\x01" * 60, b"\x02" * 1514]
    stream = GO_CONNECT_REQUEST + encode_all(LinkProtocol.GVPROXY, frames)
    assert len(GO_CONNECT_REQUEST) == 98
    assert detect_protocol(stream[:4]) is LinkProtocol.GVPROXY
    reader = HttpHeadReader()
    head = reader.receive_data(stream[:split])
    later = stream[split:]
    if head is None:
        head, later = reader.receive_data(later), b""
    assert head is not None
    check_connect_request(head)
    assert head.get("user-agent") == "Go-http-client/1.1"
    assert head.get(HEADER_WANT_REPLY) is None
    end = split if split >= len(GO_CONNECT_REQUEST) else len(stream)
    assert reader.rest == stream[len(GO_CONNECT_REQUEST) : end]
    decoder = FrameDecoder(LinkProtocol.GVPROXY)
    decoder.receive_data(reader.rest)
    decoder.receive_data(later)
    assert drain(decoder) == frames


def test_connect_reply_round_trip() -> None:
    reply = build_connect_reply({"Nitro-Netd-Address": "192.168.127.2/24"})
    head, rest = read_head(reply + b"\x00\x00")
    check_connect_reply(head)
    assert rest == b"\x00\x00"
    assert head.get(HEADER_VERSION) == PROTOCOL_VERSION
    assert head.get("nitro-netd-address") == "192.168.127.2/24"


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 200 OK", b"HTTP/1.0 200", b"HTTP/1.1 200 Fine"])
def test_connect_reply_accepted(status_line: bytes) -> None:
    check_connect_reply(read_head(status_line + b"\r\n\r\n")[0])


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 404 Not Found", b"HTTP/1.1 500", b"HTTP/2 200", b"HTTP/1.1", b"", b"200 OK"],
)
def test_connect_reply_refused(status_line: bytes) -> None:
    with pytest.raises(LinkError, match="parent refused the link"):
        check_connect_reply(read_head(status_line + b"\r\n\r\n")[0])


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /connect HTTP/1.1\r\nHost: x",
        b"POST /other HTTP/1.1\r\nHost: x",
        b"POST /connect HTTP/2.0\r\nHost: x",
        b"POST  /connect HTTP/1.1\r\nHost: x",
        b"POST /connect",
        b"",
    ],
)
def test_connect_request_wrong_start_line(request_head: bytes) -> None:
    head, _ = read_head(request_head + b"\r\n\r\n")
    with pytest.raises(LinkError, match=r"expected 'POST /connect HTTP/1\.1'"):
        check_connect_request(head)


@pytest.mark.parametrize(
    "header",
    [b"Content-Length: 5", b"content-length: 00", b"Transfer-Encoding: chunked"],
)
def test_connect_request_with_a_body(header: bytes) -> None:
    head, _ = read_head(b"POST /connect HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
    with pytest.raises(LinkError, match="empty body"):
        check_connect_request(head)


def test_connect_request_without_content_length() -> None:
    check_connect_request(read_head(b"POST /connect HTTP/1.0\r\n\r\n")[0])


def test_http_head_non_ascii() -> None:
    with pytest.raises(LinkError, match="not ASCII"):
        HttpHeadReader().receive_data("POST /connect HTTP/1.1\r\nHost: é\r\n\r\n".encode())


@pytest.mark.parametrize("line", [b"NoColon", b" Folded: value", b": no name", b"Name : x"])
def test_http_head_malformed_header_line(line: bytes) -> None:
    with pytest.raises(LinkError, match="malformed HTTP header line"):
        HttpHeadReader().receive_data(b"POST /connect HTTP/1.1\r\n" + line + b"\r\n\r\n")


def test_http_head_oversize_fed_in_pieces() -> None:
    reader = HttpHeadReader()
    fed = 0
    while fed + 100 < MAX_HANDSHAKE + 4:
        assert reader.receive_data(b"X-Filler: " + b"a" * 88 + b"\r\n") is None
        fed += 100
    with pytest.raises(LinkError, match=f"longer than {MAX_HANDSHAKE} bytes"):
        reader.receive_data(b"a" * 100)


def test_http_head_oversize_in_one_piece() -> None:
    long_line = b"X-Filler: " + b"a" * MAX_HANDSHAKE
    with pytest.raises(LinkError, match=f"longer than {MAX_HANDSHAKE} bytes"):
        HttpHeadReader().receive_data(b"POST /connect HTTP/1.1\r\n" + long_line + b"\r\n\r\n")


def test_http_head_at_the_limit() -> None:
    start = b"POST /connect HTTP/1.1\r\nX-Filler: "
    head_bytes = start + b"a" * (MAX_HANDSHAKE - len(start))
    assert len(head_bytes) == MAX_HANDSHAKE
    head, rest = read_head(head_bytes + b"\r\n\r\nrest")
    assert head.get("x-filler") == "a" * (MAX_HANDSHAKE - len(start))
    assert rest == b"rest"
    with pytest.raises(LinkError, match="longer than"):
        HttpHeadReader().receive_data(head_bytes + b"a\r\n\r\n")


@settings(max_examples=300)
@given(data=st.binary(max_size=200) | st.binary(max_size=100).map(lambda b: b"POST /" + b))
def test_http_head_arbitrary_bytes_head_none_or_link_error(data: bytes) -> None:
    reader = HttpHeadReader()
    try:
        head = reader.receive_data(data)
        if head is not None:
            check_connect_request(head)
    except LinkError:
        return
    if head is None:
        assert b"\r\n\r\n" not in data
    else:
        assert data.endswith(reader.rest)


# --- the Nitro-Netd-Offload header ---------------------------------------------------

offload_tokens = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)


def test_offload_names_on_the_wire() -> None:
    assert (HEADER_OFFLOAD, OFFLOAD_CSUM, OFFLOAD_TSO) == ("Nitro-Netd-Offload", "csum", "tso")


@settings(max_examples=200)
@given(st.frozensets(offload_tokens, max_size=6))
def test_offloads_format_then_parse_round_trip(offloads: frozenset[str]) -> None:
    value = format_offloads(offloads)
    assert parse_offloads(value) == offloads
    assert format_offloads(parse_offloads(value)) == value  # a stable, canonical form
    assert value == ", ".join(sorted(offloads))


@given(st.frozensets(offload_tokens, min_size=1, max_size=6), st.randoms())
def test_offloads_parse_ignores_order_case_blanks_and_empty_tokens(
    offloads: frozenset[str], rng: random.Random
) -> None:
    tokens = [rng.choice([t, t.upper(), f"  {t}\t", f" {t.title()} "]) for t in offloads]
    rng.shuffle(tokens)
    value = ",".join(tokens + [""] * rng.randint(0, 2) + [" "] * rng.randint(0, 2))
    assert parse_offloads(value) == offloads


def test_offloads_format_is_sorted_whatever_the_order_given() -> None:
    assert format_offloads([OFFLOAD_TSO, OFFLOAD_CSUM]) == "csum, tso"
    assert format_offloads(iter((OFFLOAD_CSUM, OFFLOAD_TSO))) == "csum, tso"
    assert format_offloads({OFFLOAD_CSUM}) == "csum"
    assert format_offloads(()) == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, frozenset()),
        ("", frozenset()),
        (" ", frozenset()),
        (",", frozenset()),
        (" , ,, ", frozenset()),
        ("csum", {"csum"}),
        ("CSUM", {"csum"}),
        ("csum, tso", {"csum", "tso"}),
        ("TSO,Csum", {"csum", "tso"}),
        (" csum ,, tso ,", {"csum", "tso"}),
        ("csum,csum", {"csum"}),
        ("csum tso", {"csum tso"}),  # blanks inside a token are not a separator
    ],
)
def test_offloads_parse(value: str | None, expected: set[str]) -> None:
    assert parse_offloads(value) == frozenset(expected)

"""The TCP send queue: a deque of host chunks read as one byte string."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nitro_netd.netstack.spans import HostSlice, HostSpan
from nitro_netd.netstack.tcp.sendqueue import SendQueue


@given(
    st.lists(st.binary(max_size=50), max_size=10),
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 80), st.integers(0, 30)), max_size=10),
)
def test_send_queue_matches_a_plain_byte_string(
    chunks: list[bytes], ops: list[tuple[int, int, int]]
) -> None:
    queue, model = SendQueue(), b""
    for chunk in chunks:
        queue.append(chunk)
        model += chunk
    for offset, n, consume in ops:
        assert bytes(queue.slice(offset, n)) == model[offset : offset + n]
        queue.consume(consume)
        model = model[consume:]
        assert len(queue) == len(model)


def test_send_queue_slice_within_one_chunk_is_a_view_not_a_copy() -> None:
    queue = SendQueue()
    queue.append(b"abcdef")
    queue.append(b"ghij")
    assert isinstance(queue.slice(1, 3), memoryview)
    assert queue.slice(4, 4) == b"efgh"


Chunk = tuple[bool, bytes]
"""(as a span?, bytes) of one host read."""


@given(
    st.lists(st.tuples(st.booleans(), st.binary(max_size=50)), max_size=10),
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 80), st.integers(0, 30)), max_size=10),
)
def test_send_queue_with_spans_gives_slices_of_the_right_stream_positions(
    chunks: list[Chunk], ops: list[tuple[int, int, int]]
) -> None:
    """Bytes and spans mixed: a slice never mixes them, may stop short where they meet,
    and a slice of spans names the right stream bytes and how far they are released."""
    source = object()
    queue, stream, consumed = SendQueue(), b"", 0
    for as_span, data in chunks:
        queue.append(HostSpan(source, len(data)) if as_span else data)
        stream += data
    for offset, n, consume in ops:
        got = queue.slice(offset, n)
        wanted = max(0, min(n, len(stream) - consumed - offset))
        assert 0 < len(got) <= wanted or len(got) == wanted == 0
        start = consumed + offset
        if isinstance(got, HostSlice):
            assert (got.source, got.position, got.released) == (source, start, consumed)
            assert _kinds(chunks, start, got.length) == {True}
        else:
            assert bytes(got) == stream[start : start + len(got)]
            assert _kinds(chunks, start, len(got)) <= {False}
        queue.consume(consume)
        consumed = min(consumed + consume, len(stream))
        assert (len(queue), queue.base) == (len(stream) - consumed, consumed)


def _kinds(chunks: list[Chunk], start: int, n: int) -> set[bool]:
    """Whether the stream bytes [start, start + n) came as spans (True) or bytes."""
    kinds, position = set(), 0
    for as_span, data in chunks:
        if n and data and position < start + n and start < position + len(data):
            kinds.add(as_span)
        position += len(data)
    return kinds


def test_send_queue_slice_runs_on_across_consecutive_spans() -> None:
    queue = SendQueue()
    queue.append(b"ab")
    queue.append(HostSpan(None, 5))
    queue.append(HostSpan(None, 5))
    queue.append(b"cd")
    assert queue.slice(0, 20) == b"ab"
    piece = queue.slice(2, 20)
    assert isinstance(piece, HostSlice)
    assert (piece.position, piece.length) == (2, 10)
    queue.consume(4)
    piece = queue.slice(0, 3)
    assert isinstance(piece, HostSlice)
    assert (piece.position, piece.length, piece.released) == (4, 3, 4)

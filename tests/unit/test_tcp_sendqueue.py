"""The TCP send queue: a deque of host chunks read as one byte string."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

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

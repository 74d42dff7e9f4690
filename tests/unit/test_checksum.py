"""The Internet checksum: both summing paths against a naive RFC 1071 reference."""

from __future__ import annotations

import importlib.util
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames import checksum
from nitro_netd.frames.checksum import internet_checksum, ones_complement_sum

HAVE_NUMPY = importlib.util.find_spec("numpy") is not None
needs_numpy = pytest.mark.skipif(not HAVE_NUMPY, reason="numpy (the `fast` extra) missing")

LENGTHS = [0, 1, 2, 3, 4, 19, 20, 255, 256, 257, 1499, 1500, 9001, 65535, 65536, 200_001]


def reference_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 §4.1, word by word with end-around carry: slow and obviously right."""
    if len(data) % 2:
        data += b"\x00"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `ones_complement_sum` as it does without numpy."""
    monkeypatch.setattr(checksum, "_np", None)


@pytest.fixture
def numpy_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `ones_complement_sum` through numpy at every length."""
    if not HAVE_NUMPY:
        pytest.skip("numpy (the `fast` extra) missing")
    monkeypatch.setattr(checksum, "_NUMPY_MIN", 0)


# --- known vectors -------------------------------------------------------------------


def test_rfc1071_example() -> None:
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (with carries 2).
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_complement_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D


def test_ipv4_header_example_verifies_to_zero() -> None:
    header = bytes.fromhex("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7")
    assert internet_checksum(header) == 0
    zeroed = header[:10] + b"\x00\x00" + header[12:]
    assert internet_checksum(zeroed) == 0xB861


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"\x00" * 1000, 0),
        (b"\xff\xff", 0xFFFF),
        (b"\xff" * 1000, 0xFFFF),
        (b"\x01", 0x0100),
        (b"\x12\x34\x56", 0x1234 + 0x5600),
    ],
)
def test_sum_edge_values(data: bytes, expected: int) -> None:
    assert checksum._sum_int(data) == expected
    assert ones_complement_sum(data) == expected
    assert reference_sum(data) == expected


def test_initial_is_added() -> None:
    assert ones_complement_sum(b"", 0x1234) == 0x1234
    assert ones_complement_sum(b"\xff\xff", 1) == 1
    assert internet_checksum(b"\x00\x01", 0xFFFE) == 0


# --- both paths agree with the reference ---------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
def test_sum_int_matches_reference(n: int) -> None:
    data = random_bytes(n, seed=n)
    assert checksum._sum_int(data) == reference_sum(data)


@needs_numpy
@pytest.mark.parametrize("n", [n for n in LENGTHS if n > 0])
def test_sum_numpy_matches_reference(n: int) -> None:
    data = random_bytes(n, seed=n)
    assert checksum._sum_numpy(data) == reference_sum(data)


@pytest.mark.parametrize("path", ["pure_python", "numpy_always"])
@pytest.mark.parametrize("n", LENGTHS)
def test_ones_complement_sum_each_path(n: int, path: str, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue(path)
    data = random_bytes(n, seed=n + 1)
    for initial in (0, 1, 0x1234, 0xFFFF):
        expected = reference_sum(data, initial)
        assert ones_complement_sum(data, initial) == expected
        assert internet_checksum(data, initial) == ~expected & 0xFFFF


@pytest.mark.parametrize("path", ["pure_python", "numpy_always"])
def test_buffer_types_and_unaligned_views(path: str, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue(path)
    data = random_bytes(3001, seed=7)
    for start in (0, 1, 2, 3):
        piece = data[start:]
        expected = reference_sum(piece)
        assert ones_complement_sum(piece) == expected
        assert ones_complement_sum(bytearray(piece)) == expected
        assert ones_complement_sum(memoryview(data)[start:]) == expected


@settings(max_examples=300)
@given(data=st.binary(max_size=2048), initial=st.integers(0, 0xFFFF))
def test_paths_agree_on_random_data(data: bytes, initial: int) -> None:
    expected = reference_sum(data, initial)
    assert checksum.fold(checksum._sum_int(data) + initial) == expected
    if HAVE_NUMPY and data:
        assert checksum.fold(checksum._sum_numpy(data) + initial) == expected
    assert ones_complement_sum(data, initial) == expected


@settings(max_examples=200)
@given(
    words=st.lists(st.sampled_from([0x0000, 0xFFFF, 0x0001, 0xFFFE, 0x8000]), max_size=600),
    initial=st.integers(0, 0xFFFF),
)
def test_paths_agree_on_carry_heavy_data(words: list[int], initial: int) -> None:
    # Runs of 0xffff and 0x0000 are where "+0" and "-0" could be confused.
    data = b"".join(w.to_bytes(2, "big") for w in words)
    expected = reference_sum(data, initial)
    assert checksum.fold(checksum._sum_int(data) + initial) == expected
    if HAVE_NUMPY and data:
        assert checksum.fold(checksum._sum_numpy(data) + initial) == expected


@given(data=st.binary(max_size=600))
def test_checksum_inserted_verifies(data: bytes) -> None:
    # Appending the checksum as one more word (at an even offset) makes the total verify.
    if len(data) % 2:
        data += b"\x00"
    assert internet_checksum(data + internet_checksum(data).to_bytes(2, "big")) == 0

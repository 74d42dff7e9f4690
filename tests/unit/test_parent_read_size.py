"""How much the parent reads from a host TCP socket at once (`host_tcp.read_size_for`)."""

from __future__ import annotations

import pytest

from nitro_netd.parent.host_tcp import READ_SIZE_LARGE, READ_SIZE_SMALL, read_size_for


@pytest.mark.parametrize(
    ("mtu", "tso", "expected"),
    [
        (65520, False, READ_SIZE_LARGE),
        (16384, False, READ_SIZE_LARGE),
        (9001, False, READ_SIZE_SMALL),
        (1500, False, READ_SIZE_SMALL),
        (1500, True, READ_SIZE_LARGE),
    ],
)
def test_parent_read_size_is_large_only_when_segments_to_the_enclave_are(
    mtu: int, tso: bool, expected: int
) -> None:
    assert read_size_for(mtu, tso) == expected
    assert READ_SIZE_SMALL < READ_SIZE_LARGE

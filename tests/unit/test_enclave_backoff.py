"""The agent's reconnect backoff schedule."""

from __future__ import annotations

import pytest

from nitro_netd.enclave.backoff import Backoff


def test_backoff_default_schedule_doubles_to_cap() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(9)]
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])


def test_backoff_reset_starts_again() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.05)


def test_backoff_custom_schedule() -> None:
    backoff = Backoff(initial=1.0, cap=5.0, factor=3.0)
    assert [backoff.next_delay() for _ in range(4)] == pytest.approx([1.0, 3.0, 5.0, 5.0])


@pytest.mark.parametrize(("initial", "cap", "factor"), [(0, 1, 2), (2, 1, 2), (1, 2, 0.5)])
def test_backoff_rejects_nonsense(initial: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial=initial, cap=cap, factor=factor)

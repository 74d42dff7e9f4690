"""BusyPoll on a stdlib selector loop whose selector records every timeout it is given:
while a window is open the loop must poll (timeout 0), and it must sleep again after."""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from types import SimpleNamespace
from typing import Any

import pytest

import nitro_netd.parent.busy_poll as busy_poll_module
from nitro_netd.parent.busy_poll import BULK_BYTES, BULK_HOLD, MAX_WINDOW, RATE_PERIOD, BusyPoll

WINDOW = 0.002
DEADLINE = 5.0


class RecordingSelector(selectors.DefaultSelector):
    """Records each select()'s timeout (None: sleep until an event), and whether the
    watched poller's window was open at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: BusyPoll | None = None
        self.calls: list[tuple[float | None, bool]] = []

    def select(self, timeout: float | None = None) -> list[Any]:
        self.calls.append((timeout, self.watched is not None and self.watched.active))
        return list(super().select(timeout))


async def until(condition: Any) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.001)


def run_on_recording_loop(body: Any) -> RecordingSelector:
    selector = RecordingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    try:
        loop.run_until_complete(body(loop))
    finally:
        loop.close()
    return selector


def test_a_kick_keeps_the_loop_polling_for_the_window_then_lets_it_sleep() -> None:
    poller: list[BusyPoll] = []

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        busy = BusyPoll(loop, WINDOW)
        poller.append(busy)
        selector_of(loop).watched = busy
        started = time.monotonic()
        busy.kick(0)
        assert busy.active
        await until(lambda: not busy.active)
        assert time.monotonic() - started >= WINDOW
        await asyncio.sleep(0.01)  # idle again: the loop may sleep

    calls = run_on_recording_loop(body).calls
    busy = poller[0]
    during = [timeout for timeout, window_open in calls if window_open]
    last_open = max(i for i, (_, window_open) in enumerate(calls) if window_open)
    after = [timeout for timeout, _ in calls[last_open + 1 :]]
    assert len(during) >= 2, "the loop did not keep turning during the window"
    assert all(timeout == 0 for timeout in during), [t for t in during if t]
    assert any(timeout for timeout in after), "the loop never slept after the window"
    assert busy.windows == 1
    assert WINDOW <= busy.spun < 1.0


def test_kicks_inside_the_window_extend_it_without_starting_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    poller: list[BusyPoll] = []
    # The poller's clock is the test's: a pause of the test process longer than the window
    # (a garbage collection, another process on the CPU) would close it for real.
    clock = [1000.0]
    monkeypatch.setattr(busy_poll_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(os, "sched_yield", lambda: None)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        busy = BusyPoll(loop, WINDOW)
        poller.append(busy)
        busy.kick(0)
        for _ in range(6):  # more work keeps arriving, every half window
            clock[0] += WINDOW / 2
            busy.kick(0)
            await asyncio.sleep(0)
            assert busy.active
        clock[0] += 2 * WINDOW  # then nothing for longer than the window
        await until(lambda: not busy.active)
        busy.kick(0)  # a new burst after the window closed
        clock[0] += 2 * WINDOW
        await until(lambda: not busy.active)

    run_on_recording_loop(body)
    assert poller[0].windows == 2
    assert poller[0].spun >= 4 * WINDOW


def test_many_small_flushes_at_a_bulk_rate_hold_polling_off_too() -> None:
    """500 Mbit/s of UDP arrives as many small flushes, none of them bulk on its own."""
    poller: list[BusyPoll] = []

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        busy = BusyPoll(loop, WINDOW)
        poller.append(busy)
        busy.kick(1400)  # one datagram: a small message, worth polling for
        assert busy.active
        await until(lambda: not busy.active)
        started = time.monotonic()
        for _ in range(BULK_BYTES // 1400 + 1):  # a millisecond's worth of datagrams
            busy.kick(1400)
        assert time.monotonic() - started < RATE_PERIOD, "the kicks took over a period"
        await until(lambda: not busy.active)
        busy.kick(1400)
        assert not busy.active, "polling went on through a bulk rate of small flushes"

    run_on_recording_loop(body)


@pytest.mark.parametrize("window", [0.0, -1e-6, MAX_WINDOW * 2])
def test_windows_outside_the_range_are_refused(window: float) -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="busy-poll window"):
            BusyPoll(loop, window)
    finally:
        loop.close()


def selector_of(loop: asyncio.AbstractEventLoop) -> RecordingSelector:
    selector = loop._selector  # type: ignore[attr-defined]
    assert isinstance(selector, RecordingSelector)
    return selector


def test_bulk_transfer_holds_polling_off_until_it_has_paused() -> None:
    """Spinning between a bulk transfer's large reads only takes CPU from the processes
    on the other end of the pipeline: a flush that moved BULK_BYTES turns kicks into
    no-ops until BULK_HOLD has passed."""
    poller: list[BusyPoll] = []

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        busy = BusyPoll(loop, WINDOW)
        poller.append(busy)
        busy.kick(BULK_BYTES)
        assert not busy.active
        bulk_ended = time.monotonic()
        busy.kick(100)  # an ACK in the middle of the transfer
        assert not busy.active
        await asyncio.sleep(BULK_HOLD * 1.1)  # the hold is a duration: let it pass
        assert time.monotonic() - bulk_ended >= BULK_HOLD
        busy.kick(100)  # small messages again, after the hold
        assert busy.active
        await until(lambda: not busy.active)

    run_on_recording_loop(body)
    assert poller[0].windows == 1


def test_no_polling_while_the_link_is_backed_up_nor_for_the_bulk_hold_after() -> None:
    """With the link to the enclave backed up the daemon waits for the agent: the enclave's
    ACKs (small flushes) must not keep it spinning on a CPU the agent needs."""
    poller: list[BusyPoll] = []

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        busy = BusyPoll(loop, MAX_WINDOW)
        poller.append(busy)
        selector_of(loop).watched = busy
        busy.kick(54)  # a window opens...
        assert busy.active
        busy.set_backlogged(True)  # ...and the link backs up: it closes at the next turn
        await until(lambda: not busy.active)
        assert busy.spun < MAX_WINDOW
        busy.kick(54)  # an ACK while backed up
        assert not busy.active
        await asyncio.sleep(BULK_HOLD * 1.1)  # however long the backlog lasts
        busy.kick(54)
        assert not busy.active
        busy.set_backlogged(False)
        released = time.monotonic()
        busy.kick(54)  # right after the backlog cleared: still bulk
        assert not busy.active
        await asyncio.sleep(BULK_HOLD * 1.1)
        assert time.monotonic() - released >= BULK_HOLD
        busy.kick(54)  # small messages again
        assert busy.active
        busy.set_backlogged(False)  # not backed up: changes nothing
        busy.kick(54)
        assert busy.active

    run_on_recording_loop(body)
    assert poller[0].windows == 2

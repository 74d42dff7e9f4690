"""The bridge's use of the event loop: how it feeds the busy poller, when it flushes host
data, and that its timers never fire before their deadline (on uvloop, whose clock and
timers have millisecond resolution, and on the stdlib loop)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from nitro_netd.netstack import StackConfig
from nitro_netd.netstack.events import FlowId, TcpData, TcpEof
from nitro_netd.parent.bridge import DEFERRED_FLUSH_BYTES, Bridge
from nitro_netd.parent.busy_poll import BusyPoll
from tests.support.fake_enclave import FakeEnclave

DEADLINE = 5.0


class RecordingPoll(BusyPoll):
    """A busy poller that records the bytes each kick reports and never spins."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop, 50e-6)
        self.kicks: list[int] = []

    def kick(self, moved: int) -> None:
        self.kicks.append(moved)


class CountingBridge(Bridge):
    """A bridge that counts its flushes and records the `now` of each timer run."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(StackConfig(), loop)
        self.flushes = 0
        self.timer_runs: list[float] = []

    def flush(self) -> None:
        self.flushes += 1
        super().flush()

    def _on_timer(self) -> None:
        self.timer_runs.append(self.loop.time())
        super()._on_timer()


def loop_factories() -> list[Any]:
    factories: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # the fast extra is optional; CI installs it
        return factories
    return [*factories, pytest.param(uvloop.new_event_loop, id="uvloop")]


def run(
    factory: Callable[[], asyncio.AbstractEventLoop], body: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    loop = factory()
    try:
        loop.run_until_complete(body())
    finally:
        loop.close()


@pytest.mark.parametrize("factory", loop_factories())
def test_each_flush_kicks_the_poller_with_the_link_bytes_it_moved(factory: Any) -> None:
    async def body() -> None:
        bridge = Bridge(StackConfig(), asyncio.get_running_loop())
        poll = RecordingPoll(bridge.loop)
        bridge.busy_poll = poll
        request = FakeEnclave().arp_request(StackConfig().gateway_ip)
        bridge.stack.receive_frame(request, now=bridge.loop.time())
        bridge.flush()  # the request in, its reply out (no link: the reply is dropped)
        bridge.flush()  # nothing new
        bridge.stack.receive_frame(request, now=bridge.loop.time())
        bridge.flush()
        stats = bridge.stack.stats
        assert stats.bytes_in == 2 * len(request)
        assert sum(poll.kicks) == stats.bytes_in + stats.bytes_out
        assert poll.kicks[0] > len(request), "the reply's bytes are not counted"
        assert poll.kicks[1:] == [0, poll.kicks[0]], "kicks are not per flush"

    run(factory, body)


@pytest.mark.parametrize("factory", loop_factories())
def test_large_host_reads_flush_once_at_the_end_of_the_turn_small_ones_at_once(
    factory: Any,
) -> None:
    async def body() -> None:
        bridge = CountingBridge(asyncio.get_running_loop())
        flow = FlowId(1)  # unknown to the stack: only the flushing is looked at
        bridge.post_event(TcpData(flow, bytes(DEFERRED_FLUSH_BYTES)))
        bridge.post_event(TcpData(flow, bytes(DEFERRED_FLUSH_BYTES)))
        assert bridge.flushes == 0, "a large read flushed before the turn ended"
        await asyncio.sleep(0)
        assert bridge.flushes == 1, "two large reads in one turn: one flush"
        bridge.post_event(TcpData(flow, b"x"))
        bridge.post_event(TcpEof(flow))
        assert bridge.flushes == 3, "small data and other events flush at once"

    run(factory, body)


@pytest.mark.parametrize("factory", loop_factories())
@pytest.mark.parametrize("delay", [0.0001, 0.0004, 0.0006, 0.0015])
def test_a_timer_never_runs_before_its_deadline(factory: Any, delay: float) -> None:
    """uvloop ran a timer due in under half a millisecond at once, while its clock still
    read the millisecond before: the stack found nothing due, and the bridge re-armed and
    ran the timer again and again until the clock ticked."""

    async def body() -> None:
        bridge = CountingBridge(asyncio.get_running_loop())
        when = bridge.loop.time() + delay
        bridge._arm_timer(when)
        deadline = time.monotonic() + DEADLINE
        while not bridge.timer_runs:
            assert time.monotonic() < deadline, "the timer never ran"
            await asyncio.sleep(0.0005)
        assert bridge.timer_runs[0] >= when
        assert len(bridge.timer_runs) == 1

    run(factory, body)


@pytest.mark.parametrize("factory", loop_factories())
def test_a_later_deadline_keeps_the_armed_timer_an_earlier_one_replaces_it(factory: Any) -> None:
    """Re-arming is lazy: a round trip moves the stack's deadline later twice (a delayed
    ACK, then a retransmission), and cancelling and re-arming each time cost a tenth of
    the daemon's CPU per round trip; the armed timer fires early instead, once."""

    async def body() -> None:
        bridge = CountingBridge(asyncio.get_running_loop())
        now = bridge.loop.time()
        bridge._arm_timer(now + 0.002)
        armed = bridge._timer
        bridge._arm_timer(now + 0.2)  # later: kept
        bridge._arm_timer(None)  # none: kept
        assert bridge._timer is armed
        bridge._arm_timer(now + 0.001)  # earlier: replaces it
        assert bridge._timer is not armed
        assert armed is not None
        assert armed.cancelled()
        later = now + 0.01  # what the stack wants next: the early run must re-arm for it
        bridge.stack.get_timer = lambda: later if not bridge.timer_runs[1:] else None  # type: ignore[method-assign]
        deadline = time.monotonic() + DEADLINE
        while len(bridge.timer_runs) < 2:
            assert time.monotonic() < deadline, "the kept timer ran early and never again"
            await asyncio.sleep(0.0005)
        assert bridge.timer_runs[0] >= now + 0.001 - 1e-9  # (uvloop: whole milliseconds)
        assert bridge.timer_runs[1] >= later - 1e-9
        assert bridge._timer is None  # then nothing was due: nothing re-armed

    run(factory, body)


@pytest.mark.parametrize("factory", loop_factories())
def test_closing_the_bridge_stops_its_timer(factory: Any) -> None:
    async def body() -> None:
        bridge = CountingBridge(asyncio.get_running_loop())
        bridge._arm_timer(bridge.loop.time() + 0.001)
        armed = bridge._timer
        bridge.close()
        assert armed is not None
        assert armed.cancelled()
        assert bridge._timer is None

    run(factory, body)

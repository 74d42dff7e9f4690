"""The bridge's link handling: host reading pauses with a backed-up link and resumes; each
new link sets the stack's offloads."""

from __future__ import annotations

import asyncio
import errno
import time
from typing import Any

from nitro_netd.netstack import StackConfig
from nitro_netd.parent.bridge import Bridge
from nitro_netd.parent.busy_poll import BusyPoll
from nitro_netd.parent.session import LinkSession


class RecordingSide:
    """A host side that records what the bridge tells it."""

    command_types: tuple[type, ...] = ()

    def __init__(self) -> None:
        self.paused: list[bool] = []

    def execute(self, command: Any) -> None:
        raise AssertionError(f"unexpected command {command!r}")

    def set_link_paused(self, paused: bool) -> None:
        self.paused.append(paused)

    def close_all(self) -> None:
        """Nothing to close."""


async def test_new_link_lifts_the_pause_of_a_backed_up_old_link() -> None:
    bridge = Bridge(StackConfig(), asyncio.get_running_loop())
    side = RecordingSide()
    bridge.add_host_side(side)
    old, new = LinkSession(bridge, max_frame=65535), LinkSession(bridge, max_frame=65535)
    bridge.on_link_up(old)
    bridge.on_link_writable(old, False)
    assert side.paused[-1] is True
    bridge.on_link_up(new)
    assert side.paused[-1] is False
    bridge.on_link_writable(old, False)  # the replaced link no longer counts
    assert side.paused[-1] is False
    bridge.close()


async def test_each_new_link_sets_the_stack_offloads_and_tells_the_observers() -> None:
    bridge = Bridge(StackConfig(mtu=1500), asyncio.get_running_loop())
    seen: list[tuple[LinkSession, bool, bool]] = []
    output = bridge.stack.output
    bridge.link_observers.append(
        lambda s: seen.append((s, output.checksum_offload, output.segmentation_offload))
    )
    tso, plain = LinkSession(bridge, max_frame=65535), LinkSession(bridge, max_frame=1514)
    tso.checksum_offload = tso.segmentation_offload = True
    bridge.on_link_up(tso)
    assert output.segment_size(1460) == 44 * 1460
    bridge.on_link_up(plain)  # replaces the TSO link: back to MSS-sized segments
    assert output.segment_size(1460) == 1460
    assert seen == [(tso, True, True), (plain, False, False)]
    assert (bridge.segmentation_allowed(), bridge.offload_allowed()) == (True, True)
    bridge.close()
    strict = Bridge(StackConfig(segmentation_offload=False), asyncio.get_running_loop())
    assert (strict.segmentation_allowed(), strict.offload_allowed()) == (False, True)
    strict.close()


async def test_a_backed_up_link_stops_busy_polling_until_it_drains() -> None:
    bridge = Bridge(StackConfig(), asyncio.get_running_loop())
    backlog: list[bool] = []

    class RecordingPoll(BusyPoll):
        def set_backlogged(self, backlogged: bool) -> None:
            backlog.append(backlogged)
            super().set_backlogged(backlogged)

    bridge.busy_poll = RecordingPoll(bridge.loop, 50e-6)
    session = LinkSession(bridge, max_frame=65535)
    bridge.on_link_up(session)
    bridge.on_link_writable(session, False)
    assert backlog[-1] is True
    bridge.busy_poll.kick(54)  # an ACK from the enclave
    deadline = time.monotonic() + 5.0
    while bridge.busy_poll.active:  # the window the link-up flush opened closes
        assert time.monotonic() < deadline, "spinning while the link is backed up"
        await asyncio.sleep(0)
    bridge.busy_poll.kick(54)
    assert not bridge.busy_poll.active, "a window opened while the link is backed up"
    bridge.on_link_writable(session, True)
    assert backlog[-1] is False
    bridge.on_link_writable(session, False)
    bridge.on_link_down(session, "gone")  # a dead link is not a backed-up one
    assert backlog[-1] is False
    bridge.close()


async def test_frames_made_while_no_link_is_up_are_counted_as_dropped() -> None:
    from nitro_netd.frames.errors import DropReason
    from tests.support.fake_enclave import FakeEnclave

    bridge = Bridge(StackConfig(), asyncio.get_running_loop())
    request = FakeEnclave().arp_request(StackConfig().gateway_ip)
    bridge.stack.receive_frame(request, now=bridge.loop.time())  # e.g. a frame in flight
    bridge.flush()  # its reply has no link to go to
    assert bridge.stack.stats.drops[DropReason.NO_LINK] == 1
    bridge.close()


async def test_a_host_sides_bug_ends_the_commands_flow_instead_of_leaving_it_stuck() -> None:
    """A connect that raised never started (the stack has no timer of its own for it);
    a send that raised may be half written: either way the flow must end."""
    from ipaddress import IPv4Address

    from nitro_netd.frames.errors import DropReason
    from nitro_netd.netstack.events import HostEvent, TcpConnect, TcpFailed, UdpClose, UdpFailed

    class BuggySide(RecordingSide):
        command_types = (TcpConnect, UdpClose)

        def execute(self, command: Any) -> None:
            raise RuntimeError("a bug")

    bridge = Bridge(StackConfig(), asyncio.get_running_loop())
    bridge.add_host_side(BuggySide())
    posted: list[HostEvent] = []
    arrived = asyncio.Event()

    def record(event: HostEvent) -> None:
        posted.append(event)
        arrived.set()

    bridge.post_event = record  # type: ignore[method-assign]
    bridge.execute(TcpConnect(7, IPv4Address("198.18.0.2"), 80, 10.0))
    bridge.execute(UdpClose(8))
    async with asyncio.timeout(5):
        while len(posted) < 2:
            arrived.clear()
            await arrived.wait()
    assert posted == [TcpFailed(7, errno.EIO), UdpFailed(8, errno.EIO)]
    assert bridge.stack.stats.drops[DropReason.INTERNAL_ERROR] == 2
    bridge.close()

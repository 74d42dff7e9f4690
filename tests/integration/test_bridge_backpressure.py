"""The bridge's link backpressure: host reading pauses with a backed-up link, and resumes."""

from __future__ import annotations

import asyncio
from typing import Any

from nitro_netd.netstack import StackConfig
from nitro_netd.parent.bridge import Bridge
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

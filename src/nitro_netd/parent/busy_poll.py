"""Busy polling: keep the event loop awake for a short window after each burst of work.

Theory of operation
-------------------
A round trip through the bridge wakes the daemon twice (the enclave's request on the
link, the world's answer on a host socket). On a virtual machine a sleeping daemon's vCPU
halts, and waking it costs a cross-CPU interrupt and a VM exit, paid by the waker and the
woken. On the 2-core simulator machine that was most of the daemon's CPU per round trip
and about 100 µs of its latency (bench/README.md). Go programs such as gvproxy avoid most
of it without trying: Go's scheduler spins briefly before it parks a thread.

`BusyPoll.kick` is called after every flush. It keeps one callback re-scheduling itself
with ``call_soon`` until `window` seconds (a monotonic clock with sub-microsecond
resolution: uvloop's ``loop.time()`` has only milliseconds) have passed without another
kick. While that callback is pending the loop polls its descriptors with a zero timeout
instead of sleeping, so the next event is picked up at once and nothing has to be woken.
Each turn also yields the CPU (``sched_yield``): a task sharing this CPU that the daemon
just woke (the world's server, the agent) runs at once instead of waiting out the
spinner's time slice. Without it, runs where they shared a CPU were 100 µs slower.

The cost is bounded: at most `window` of CPU per burst of work, nothing while idle. In a
ping-pong it spins through the gaps shorter than `window`, instead of sleeping and being
woken. Bulk transfer is left alone: once `BULK_BYTES` have crossed the link within one
`RATE_PERIOD` (in one flush or in many small ones, as 500 Mbit/s of UDP does), kicks do
nothing for `BULK_HOLD`. Between a bulk flow's reads the loop would spin on a CPU that the
flow's other processes (the sender, the agent, the receiver) need: a few percent of
world→enclave throughput on 2 cores. Nor does the loop spin while the link to the
enclave is backed up (`set_backlogged`, from the link writer's pause): the daemon is then
waiting for the agent, not for a small message, and with 8 bulk streams world→enclave
that was half of the time (the enclave's ACKs alone kept kicking; 7-12 % of the wall
time went to spinning). When the backlog clears, the bulk hold starts as if bulk data had
just moved. `spun` accounts the wall time the loop was kept
awake, work included (``busy_poll.seconds`` in the status, and
``nitro_netd_busy_poll_seconds_total``). A window of 0 turns it off (``--busy-poll-us 0``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Final

DEFAULT_WINDOW: Final = 50e-6
"""Seconds of polling after the last burst of work (``--busy-poll-us``'s default)."""
MAX_WINDOW: Final = 0.01
"""The longest window ``--busy-poll-us`` takes: beyond it, sleeping is cheaper."""
BULK_BYTES: Final = 32 * 1024
"""Link bytes (either way) that, moved within one `RATE_PERIOD`, mean bulk transfer..."""
RATE_PERIOD: Final = 0.001
"""(so 32 KiB per millisecond: about 260 Mbit/s)..."""
BULK_HOLD: Final = 0.01
"""...and for this many seconds after it the loop sleeps as soon as it is idle."""


class BusyPoll:
    """Keeps `loop` polling for `window` seconds after each `kick`; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, window: float) -> None:
        if not 0 < window <= MAX_WINDOW:
            raise ValueError(f"busy-poll window {window} s is outside (0, {MAX_WINDOW}]")
        self.window = window
        self.spun = 0.0
        """Wall seconds the loop was kept from sleeping (the work in between included)."""
        self.windows = 0
        """Windows started (bursts of work that were followed by polling)."""
        self._loop = loop
        self._until = 0.0
        self._bulk_until = 0.0
        self._rate_start = 0.0
        self._rate_bytes = 0
        self._started = 0.0
        self._active = False
        self._backlogged = False

    def kick(self, moved: int) -> None:
        """Work that moved `moved` link bytes was just done: poll until `window` has passed
        without more, unless bulk data is moving (see the module docstring)."""
        now = time.monotonic()
        if now - self._rate_start >= RATE_PERIOD:
            self._rate_start, self._rate_bytes = now, 0
        self._rate_bytes += moved
        if self._rate_bytes >= BULK_BYTES:
            self._bulk_until = now + BULK_HOLD
        if now < self._bulk_until or self._backlogged:
            return
        self._until = now + self.window
        if not self._active:
            self._active = True
            self._started = now
            self.windows += 1
            self._loop.call_soon(self._turn)

    def set_backlogged(self, backlogged: bool) -> None:
        """The link to the enclave is (or no longer is) backed up: while it is, kicks do
        nothing and an open window closes at its next turn; after it, the bulk hold runs."""
        if self._backlogged and not backlogged:
            self._bulk_until = time.monotonic() + BULK_HOLD
        self._backlogged = backlogged

    def _turn(self) -> None:
        now = time.monotonic()
        if now < self._until and not self._backlogged:
            os.sched_yield()
            self._loop.call_soon(self._turn)
        else:
            self._active = False
            self.spun += now - self._started

    @property
    def active(self) -> bool:
        """True while the loop is being kept awake."""
        return self._active

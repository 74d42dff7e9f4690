"""Following the named enclave through ``nitro-cli describe-enclaves``.

Theory of operation
-------------------
With ``--enclave-name NAME`` and a ``nitro-cli`` to run, the daemon polls
``nitro-cli describe-enclaves`` every few seconds (``--enclave-poll``). The JSON it prints is
a list of objects with "EnclaveName", "EnclaveCID" and "State"; the enclave named NAME in
state RUNNING gives the CID that links must come from (`decide_pin`). A link from an
unknown CID triggers an immediate poll before the agent's next attempt, so a freshly
restarted enclave is accepted within one reconnect of the agent.

The enclave counts as *followed* once it has been seen running. With
``--exit-with-enclave``, the first poll after that which no longer finds it running stops
the daemon (exit 0). A failing ``nitro-cli`` run (status, bad JSON, timeout) changes
nothing. It is warned about when nitro-cli starts failing and then at most every
`FAILURE_WARNING_INTERVAL` seconds (with the number of failed polls in between), not at
every poll; its return is logged too. The last error is kept for the status (`error`).
From a failed run's stderr the error-code line (``[ E39 ] ...``) is kept: nitro-cli's last
line names a new log file on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

logger = logging.getLogger(__name__)

DEFAULT_POLL: Final = 3.0
CLI_TIMEOUT: Final = 10.0
RUNNING: Final = "RUNNING"
FAILURE_WARNING_INTERVAL: Final = 600.0
"""Seconds between two warnings that nitro-cli keeps failing."""
WORKED_FOR: Final = 60.0
"""A failure after nitro-cli worked this long is news: warned about at once."""
_ERROR_CODE_LINE: Final = re.compile(r"^\[\s*E\d+\s*\]")
"""nitro-cli's error lines: ``[ E39 ] Enclave process connection failure. ...``."""


class NitroCliError(Exception):
    """``nitro-cli`` failed or printed something we cannot read."""


@dataclass(frozen=True, slots=True)
class EnclaveInfo:
    """One enclave as ``nitro-cli describe-enclaves`` reports it."""

    name: str
    cid: int
    state: str


def parse_describe(text: str) -> list[EnclaveInfo]:
    """Parse the output of ``nitro-cli describe-enclaves``.

    Raises:
        NitroCliError: not a JSON list of enclave objects.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NitroCliError(f"describe-enclaves printed no JSON: {exc}") from None
    if not isinstance(data, list):
        raise NitroCliError("describe-enclaves printed JSON that is not a list")
    return [_parse_one(item) for item in data]


def _parse_one(item: Any) -> EnclaveInfo:
    try:
        return EnclaveInfo(str(item["EnclaveName"]), int(item["EnclaveCID"]), str(item["State"]))
    except (KeyError, TypeError, ValueError):
        raise NitroCliError(
            f"describe-enclaves entry without name, CID or state: {item!r}"
        ) from None


def find_running(enclaves: list[EnclaveInfo], name: str) -> EnclaveInfo | None:
    """The running enclave called `name`, or None."""
    for enclave in enclaves:
        if enclave.name == name and enclave.state.upper() == RUNNING:
            return enclave
    return None


class PinVerdict(enum.Enum):
    """What to do with a new link, given its peer CID."""

    ACCEPT = "accept"
    """It comes from the followed enclave's CID."""
    REFUSE = "refuse"
    """Another CID, or the followed enclave is not running."""
    UNPINNED = "unpinned"
    """No enclave is followed (no name or no nitro-cli): accept."""
    NOT_VSOCK = "not vsock"
    """A unix link has no CID: accept without pinning."""


def decide_pin(*, following: bool, enclave_cid: int | None, peer_cid: int | None) -> PinVerdict:
    """Decide whether a link from `peer_cid` may go live.

    Args:
        following: an enclave is followed through nitro-cli.
        enclave_cid: its CID while it runs, else None.
        peer_cid: the link's peer CID, None for a unix link.
    """
    if peer_cid is None:
        return PinVerdict.NOT_VSOCK
    if not following:
        return PinVerdict.UNPINNED
    return PinVerdict.ACCEPT if peer_cid == enclave_cid else PinVerdict.REFUSE


async def describe_enclaves(nitro_cli: str, time_limit: float = CLI_TIMEOUT) -> list[EnclaveInfo]:
    """Run ``nitro-cli describe-enclaves`` and parse its output.

    Raises:
        NitroCliError: it could not run, failed, timed out or printed garbage.
    """
    try:
        process = await asyncio.create_subprocess_exec(
            nitro_cli,
            "describe-enclaves",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise NitroCliError(f"cannot run {nitro_cli}: {exc.strerror or exc}") from None
    try:
        out, err = await asyncio.wait_for(process.communicate(), time_limit)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise NitroCliError(f"{nitro_cli} describe-enclaves took over {time_limit:g} s") from None
    if process.returncode != 0:
        detail = summarize_stderr(err.decode(errors="replace"))
        raise NitroCliError(f"{nitro_cli} describe-enclaves exited {process.returncode}: {detail}")
    return parse_describe(out.decode(errors="replace"))


def summarize_stderr(text: str) -> str:
    """The line of a failed nitro-cli run's stderr that says what failed.

    That is its last error-code line (``[ E39 ] ...``); nitro-cli ends with a line naming
    a fresh log file, useless in a warning. Without an error-code line: the last line.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    coded = [line for line in lines if _ERROR_CODE_LINE.match(line)]
    return (coded or lines or ["no output"])[-1]


class EnclaveWatcher:
    """Polls nitro-cli for one enclave; see the module docstring."""

    def __init__(
        self,
        name: str,
        nitro_cli: str,
        *,
        interval: float = DEFAULT_POLL,
        on_gone: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.nitro_cli = nitro_cli
        self.interval = interval
        self.on_gone = on_gone
        """Called once when a followed enclave disappears (--exit-with-enclave)."""
        self.current: EnclaveInfo | None = None
        self.seen = False
        self.polls = 0
        self.error: str | None = None
        """Why the last poll failed; None once a poll works."""
        self._clock = clock
        self._failures = 0
        """Failed polls not yet warned about."""
        self._next_warning = 0.0
        self._warned = False
        """The current failure was warned about (so its end is logged)."""
        self._last_failure = -math.inf
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def cid(self) -> int | None:
        """The CID of the running enclave, or None."""
        return self.current.cid if self.current else None

    def start(self) -> None:
        """Start polling in the background."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    def poll_soon(self) -> None:
        """Poll now instead of at the next interval (a link from an unknown CID came)."""
        self._wake.set()

    async def close(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def poll_once(self) -> None:
        """Run nitro-cli once and update the followed enclave."""
        self.polls += 1
        try:
            enclaves = await describe_enclaves(self.nitro_cli)
        except NitroCliError as exc:
            self.failed(str(exc))
            return
        self.update(find_running(enclaves, self.name))

    def failed(self, error: str) -> None:
        """Take in one failed poll: warn when nitro-cli starts failing after working for
        `WORKED_FOR` seconds, and otherwise at most every `FAILURE_WARNING_INTERVAL`
        seconds (a nitro-cli failing and working by turns is one story, not news at every
        turn)."""
        now = self._clock()
        news = self.error is None and now - self._last_failure >= WORKED_FOR
        self.error = error
        self._failures += 1
        self._last_failure = now
        if now < self._next_warning and not news:
            return
        self._next_warning = now + FAILURE_WARNING_INTERVAL
        more = self._failures - 1
        since = f" ({more} more failed polls since the last warning)" if more else ""
        self._failures = 0
        self._warned = True
        logger.warning("enclave %s: %s%s", self.name, error, since)

    def update(self, found: EnclaveInfo | None) -> None:
        """Take in one poll's result (separate from polling so it can be tested)."""
        if self.error is not None:
            if self._warned:  # (a failure not warned about is not news either)
                logger.info("enclave %s: nitro-cli works again", self.name)
            self.error, self._warned = None, False
        old, self.current = self.current, found
        if found is not None and (old is None or old.cid != found.cid):
            logger.info(
                "enclave %s is running with CID %d: links pinned to it", self.name, found.cid
            )
            self.seen = True
        elif found is None and old is not None:
            logger.info("enclave %s is gone (CID %d)", self.name, old.cid)
        if found is None and self.seen and self.on_gone is not None:
            on_gone, self.on_gone = self.on_gone, None
            on_gone()

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

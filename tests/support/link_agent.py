"""An in-process parent daemon and a fake agent speaking the link protocol to it.

For integration tests: the daemon runs `serve()` on a unix socket in the test's loop, and
`LinkAgent` plays the enclave's agent with frames built by `FakeEnclave`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from nitro_netd.link import FrameDecoder, LinkProtocol, build_connect_request, encode_frame
from nitro_netd.netstack import StackConfig
from nitro_netd.parent import DaemonConfig, serve
from nitro_netd.transport import parse_endpoint

TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def running(config: DaemonConfig) -> AsyncIterator[None]:
    """Run the daemon with `config` from its readiness until the block ends."""
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(config, stop, ready.set))
    await asyncio.wait_for(ready.wait(), TIMEOUT)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


@contextlib.asynccontextmanager
async def running_daemon(path: Path, stack: StackConfig | None = None) -> AsyncIterator[None]:
    """Run the daemon listening on `unix://path` until the block ends."""
    config = DaemonConfig(listen=parse_endpoint(f"unix://{path}"), stack=stack or StackConfig())
    async with running(config):
        yield


class LinkAgent:
    """The agent's end of a gvproxy-framed link."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(LinkProtocol.GVPROXY)

    @classmethod
    async def connect(cls, path: Path) -> LinkAgent:
        """Connect and send the `POST /connect` request (no reply asked)."""
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(build_connect_request({}))
        return cls(reader, writer)

    def send(self, frame: bytes) -> None:
        """Send one frame to the daemon."""
        self.writer.write(encode_frame(LinkProtocol.GVPROXY, frame))

    async def receive(self) -> bytes:
        """The next frame from the daemon (within `TIMEOUT`)."""
        async with asyncio.timeout(TIMEOUT):
            while (frame := self.decoder.maybe_next_frame()) is None:
                data = await self.reader.read(1 << 17)
                if not data:
                    raise EOFError("daemon closed the link")
                self.decoder.receive_data(data)
        return bytes(frame)

    async def receive_matching(self, accept: Callable[[bytes], bool]) -> bytes:
        """The next frame `accept` takes, skipping others (ARP, unrelated replies)."""
        while not accept(frame := await self.receive()):
            pass
        return frame

    def close(self) -> None:
        """Close the link."""
        self.writer.close()


class LogWaiter(logging.Handler):
    """Sets `seen` once a record containing `text` is logged (attach it to a logger)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()

    @contextlib.contextmanager
    def attached(self, logger: logging.Logger) -> Iterator[LogWaiter]:
        """Attach to `logger` (at DEBUG) for the block."""
        level = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)

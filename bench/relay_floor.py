"""The floor for a Python parent: what forwarding bytes through uvloop costs a round trip.

A 1-byte ping-pong over loopback, once straight to an echo server and once through a
uvloop relay that does nothing but forward bytes (``data_received`` -> ``write``): two
Python passes per round trip, as in the daemon, with no netstack at all. The difference
is the least any Python parent adds to a round trip on this machine.

    python bench/relay_floor.py [--rounds N]

Needs uvloop (the ``fast`` extra). Loopback only; every process is its own child.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.synchronize
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from typing import cast

ECHO_PORT = 9461
RELAY_PORT = 9462


def _echo_server(ready: multiprocessing.synchronize.Event) -> None:
    with socket.create_server(("127.0.0.1", ECHO_PORT)) as server:
        ready.set()
        while True:
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)


class _Half(asyncio.Protocol):
    """One side of a relayed connection: what it reads goes out of the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Half | None = None
        self.early = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.other is None or self.other.transport is None:
            self.early += data
        else:
            self.other.transport.write(data)

    def join(self, other: _Half) -> None:
        self.other, other.other = other, self
        if self.early and other.transport is not None:
            other.transport.write(bytes(self.early))


async def _relay(ready: multiprocessing.synchronize.Event) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    class Inbound(_Half):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            task = loop.create_task(self._connect())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def _connect(self) -> None:
            _, outbound = await loop.create_connection(_Half, "127.0.0.1", ECHO_PORT)
            self.join(outbound)

    server = await loop.create_server(Inbound, "127.0.0.1", RELAY_PORT)
    ready.set()
    async with server:
        await server.serve_forever()


def _run_relay(ready: multiprocessing.synchronize.Event) -> None:
    import uvloop

    uvloop.run(_relay(ready))


def round_trips_us(port: int, rounds: int) -> list[float]:
    """1-byte round trips to `port`, in microseconds."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            conn.sendall(b"x")
            if not conn.recv(1):
                raise ConnectionError("the echo closed")
            times.append((time.perf_counter() - start) * 1e6)
    return times


@contextlib.contextmanager
def _process(target: Callable[[multiprocessing.synchronize.Event], None]) -> Iterator[None]:
    ready = multiprocessing.Event()
    process = multiprocessing.Process(target=target, args=(ready,), daemon=True)
    process.start()
    try:
        if not ready.wait(10):
            raise TimeoutError(f"{target} did not start")
        yield
    finally:
        process.kill()
        process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    with _process(_echo_server):
        direct = statistics.median(round_trips_us(ECHO_PORT, args.rounds))
        with _process(_run_relay):
            relayed = statistics.median(round_trips_us(RELAY_PORT, args.rounds))
    print(f"1-byte round trip p50: direct {direct:.1f} us, through a uvloop relay "
          f"{relayed:.1f} us: the relay adds {relayed - direct:.1f} us")  # fmt: skip


if __name__ == "__main__":
    main()

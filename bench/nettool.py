"""Small TCP tools that `bench/run.py` runs inside the simulator's namespaces.

Standard library only (it runs under `ip netns exec` with the same interpreter). Every
client mode prints one JSON line and exits 0 on success, 1 on failure.

    python bench/nettool.py server ADDR PORT        # threaded 1-byte echo server
    python bench/nettool.py probe ADDR PORT SECONDS # retry a round trip until it works
    python bench/nettool.py latency ADDR PORT ROUNDS WARMUP
    python bench/nettool.py crr ADDR PORT COUNT     # connect, 1-byte round trip, close
    python bench/nettool.py idle-server ADDR PORT   # asyncio 1-byte echo server, many conns
    python bench/nettool.py idle ADDR PORT COUNT CONCURRENCY OPEN_TIMEOUT CHECK_TIMEOUT

`idle` opens COUNT connections (at most CONCURRENCY connects in flight) and holds them:
it prints `{"phase": "open", ...}` once all are open (or OPEN_TIMEOUT seconds passed),
waits for a line on stdin (the harness measures the parent engine's memory meanwhile; EOF
or 60 s without a line also go on), then checks every open connection with a 1-byte round
trip (within CHECK_TIMEOUT seconds), closes them all and prints the final line. Both idle
modes raise their open-files soft limit to the hard limit.

sockperf is not packaged in Debian 12, so latency is measured here: one connection with
TCP_NODELAY, 1-byte request and 1-byte answer, timed with `perf_counter_ns`. The figures
include the Python client's and server's own overhead, which is the same for every peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import statistics
import sys
import threading
import time
from typing import Any, Final

HOLD_TIMEOUT: Final = 60.0
"""How long `idle` holds its connections waiting for the harness's go-ahead line."""
CONNECT_TIMEOUT: Final = 15.0
"""One connect of `idle`; the whole open phase is bounded by OPEN_TIMEOUT as well."""


def emit(ok: bool, **fields: Any) -> int:
    print(json.dumps({"ok": ok, **fields}), flush=True)
    return 0 if ok else 1


def serve(address: str, port: int) -> int:
    listener = socket.create_server((address, port), backlog=1024, reuse_port=False)
    print(json.dumps({"listening": f"{address}:{port}"}), flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def echo(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
        except OSError:
            return


def round_trip(sock: socket.socket) -> None:
    sock.sendall(b"x")
    if not sock.recv(1):
        raise ConnectionError("server closed the connection")


def connect(address: str, port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((address, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def probe(address: str, port: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    attempts = 0
    last = ""
    while time.monotonic() < deadline:
        attempts += 1
        try:
            with connect(address, port, timeout=2.0) as sock:
                round_trip(sock)
            return emit(True, attempts=attempts)
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
    return emit(False, attempts=attempts, error=last)


def latency(address: str, port: int, rounds: int, warmup: int) -> int:
    samples: list[int] = []
    with connect(address, port) as sock:
        for _ in range(warmup):
            round_trip(sock)
        for _ in range(rounds):
            start = time.perf_counter_ns()
            round_trip(sock)
            samples.append(time.perf_counter_ns() - start)
    samples.sort()
    micros = [s / 1000 for s in samples]
    return emit(
        True,
        rounds=rounds,
        p50_us=statistics.median(micros),
        p99_us=micros[min(len(micros) - 1, int(len(micros) * 0.99))],
        mean_us=statistics.fmean(micros),
        max_us=micros[-1],
    )


def crr(address: str, port: int, count: int) -> int:
    start = time.perf_counter()
    for _ in range(count):
        with connect(address, port) as sock:
            round_trip(sock)
    elapsed = time.perf_counter() - start
    return emit(True, connections=count, seconds=elapsed, conns_per_s=count / elapsed)


def raise_file_limit() -> int:
    """Raise the soft open-files limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(hard)


class EchoProtocol(asyncio.Protocol):
    """Echo whatever arrives; close when the peer closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool | None:
        return False  # close our side too


def idle_server(address: str, port: int) -> int:
    limit = raise_file_limit()

    async def serve_forever() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            EchoProtocol, address, port, backlog=4096, reuse_address=True
        )
        print(json.dumps({"listening": f"{address}:{port}", "nofile": limit}), flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve_forever())
    return 0


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def idle_client(
    address: str, port: int, count: int, concurrency: int, open_timeout: float,
    check_timeout: float,
) -> int:  # fmt: skip
    limit = raise_file_limit()
    if limit < count + 64:
        return emit(False, error=f"open-files hard limit {limit} is too low for {count} conns")
    conns: list[Conn] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(concurrency)

    async def open_one() -> None:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(address, port), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns.append((reader, writer))

    start = time.perf_counter()
    tasks = [asyncio.create_task(open_one()) for _ in range(count)]
    _, open_pending = await asyncio.wait(tasks, timeout=open_timeout)
    open_seconds = time.perf_counter() - start
    for open_task in open_pending:
        open_task.cancel()
    await asyncio.gather(*open_pending, return_exceptions=True)
    timed_out = bool(open_pending)
    print(
        json.dumps({
            "phase": "open", "opened": len(conns), "failed": len(failures),
            "timed_out": timed_out, "seconds": open_seconds,
        }),
        flush=True,
    )  # fmt: skip

    # Hold every connection until the harness has measured (a line on stdin, or EOF).
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stdin.readline(), HOLD_TIMEOUT)
    transport.close()
    held_seconds = time.perf_counter() - start - open_seconds

    check_failures: list[str] = []
    check_gate = asyncio.Semaphore(1000)

    async def check_one(conn: Conn) -> bool:
        reader, writer = conn
        async with check_gate:
            try:
                writer.write(b"x")
                await writer.drain()
                await reader.readexactly(1)
            except (OSError, asyncio.IncompleteReadError) as exc:
                check_failures.append(f"{type(exc).__name__}: {exc}")
                return False
            return True

    check_start = time.perf_counter()
    checks = [asyncio.create_task(check_one(conn)) for conn in conns]
    done, pending = await asyncio.wait(checks, timeout=check_timeout) if checks else (set(), set())
    check_seconds = time.perf_counter() - check_start
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    usable = sum(1 for task in done if not task.cancelled() and task.result())
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for _, writer in conns), return_exceptions=True)

    errors = []
    if timed_out:
        errors.append(
            f"only {len(conns)} of {count} connections open after {open_timeout:g} s (aborted)"
        )
    elif len(conns) < count:
        errors.append(f"{len(failures)} of {count} connects failed, first: {failures[0]}")
    if usable < len(conns):
        reason = check_failures[0] if check_failures else f"timed out after {check_timeout:g} s"
        errors.append(f"{len(conns) - usable} of {len(conns)} open connections failed the "
                      f"1-byte round trip, first: {reason}")  # fmt: skip
    return emit(
        not errors,
        requested=count, opened=len(conns), connect_failures=len(failures),
        open_seconds=open_seconds, conns_per_s=len(conns) / open_seconds if conns else 0.0,
        held_seconds=held_seconds, usable=usable, check_seconds=check_seconds,
        checked=len(conns), nofile=limit, **({"error": "; ".join(errors)} if errors else {}),
    )  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    mode, address, port = argv[0], argv[1], int(argv[2])
    try:
        if mode == "server":
            return serve(address, port)
        if mode == "probe":
            return probe(address, port, float(argv[3]))
        if mode == "latency":
            return latency(address, port, int(argv[3]), int(argv[4]))
        if mode == "crr":
            return crr(address, port, int(argv[3]))
        if mode == "idle-server":
            return idle_server(address, port)
        if mode == "idle":
            count, concurrency = int(argv[3]), int(argv[4])
            open_timeout, check_timeout = float(argv[5]), float(argv[6])
            return asyncio.run(
                idle_client(address, port, count, concurrency, open_timeout, check_timeout)
            )
    except OSError as exc:
        return emit(False, error=f"{type(exc).__name__}: {exc}")
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

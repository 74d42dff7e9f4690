"""Small TCP tools that `bench/run.py` runs inside the simulator's namespaces.

Standard library only (it runs under `ip netns exec` with the same interpreter). Every
client mode prints one JSON line and exits 0 on success, 1 on failure.

    python bench/nettool.py server ADDR PORT        # threaded 1-byte echo server
    python bench/nettool.py probe ADDR PORT SECONDS # retry a round trip until it works
    python bench/nettool.py latency ADDR PORT ROUNDS WARMUP
    python bench/nettool.py crr ADDR PORT COUNT     # connect, 1-byte round trip, close

sockperf is not packaged in Debian 12, so latency is measured here: one connection with
TCP_NODELAY, 1-byte request and 1-byte answer, timed with `perf_counter_ns`. The figures
include the Python client's and server's own overhead, which is the same for every peer.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import threading
import time
from typing import Any


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
    except OSError as exc:
        return emit(False, error=f"{type(exc).__name__}: {exc}")
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A TCP test peer run inside the simulator's namespaces (`python tcp_tool.py ...`).

`server ADDR PORT` serves every scenario; the client picks one with its first line:

* ``UP n``        the client sends n bytes then SHUT_WR; the server answers their sha256.
* ``DOWN n``      the server sends n random bytes then their sha256 digest (32 bytes), closes.
* ``MIX up down`` both at once: the client sends `up` bytes then SHUT_WR; the server sends
                  `down` random bytes, then (after the client's EOF) the sha256 of what it got.
* ``BANNER``      the server speaks first: it sends a banner without reading anything.
* ``CLOSEFIRST n`` the server sends n bytes and closes both ways at once.
* ``DOWNUP n``    the server sends n bytes and SHUT_WR, then reads until EOF and answers the
                  sha256 of that (a half-closed server still receives).
* ``RST``         the server aborts the connection (SO_LINGER 0): the client must see a reset.
* ``SLOWREAD n``  like UP, but the server reads slowly (the window must throttle the client).

Every client command prints one JSON line with what it measured; it exits non-zero on a
mismatch. Used only by tests/e2e; no external dependencies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import struct
import sys
import time
from typing import Any

CHUNK = 256 << 10


# --- server ------------------------------------------------------------------------------


async def _send_random(writer: asyncio.StreamWriter, n: int) -> bytes:
    digest = hashlib.sha256()
    while n > 0:
        block = os.urandom(min(CHUNK, n))
        digest.update(block)
        writer.write(block)
        await writer.drain()
        await asyncio.sleep(0)  # drain() never yields on a fast socket: let others send too
        n -= len(block)
    return digest.digest()


async def _read_all(reader: asyncio.StreamReader, delay: float = 0.0) -> tuple[bytes, int]:
    digest, count = hashlib.sha256(), 0
    while block := await reader.read(CHUNK if not delay else 16384):
        digest.update(block)
        count += len(block)
        if delay:
            await asyncio.sleep(delay)
    return digest.digest(), count


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = (await reader.readline()).decode().split()
        await _SCENARIOS[line[0]](reader, writer, [int(x) for x in line[1:]])
    except (ConnectionError, OSError, IndexError, KeyError):
        pass
    finally:
        writer.close()


async def _up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: list[int]) -> None:
    digest, _ = await _read_all(reader)
    writer.write(digest)
    await writer.drain()


async def _slowread(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: list[int]
) -> None:
    digest, _ = await _read_all(reader, delay=0.002)
    writer.write(digest)
    await writer.drain()


async def _down(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: list[int]
) -> None:
    writer.write(await _send_random(writer, args[0]))
    await writer.drain()


async def _mix(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: list[int]) -> None:
    upload = asyncio.ensure_future(_read_all(reader))
    sent = await _send_random(writer, args[1])
    got, _ = await upload
    writer.write(sent + got)
    await writer.drain()


async def _banner(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: list[int]
) -> None:
    writer.write(b"220 nitro-netd test server ready\r\n")
    await writer.drain()
    await reader.read(1)


async def _closefirst(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: list[int]
) -> None:
    writer.write(await _send_random(writer, args[0]))
    await writer.drain()


async def _downup(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: list[int]
) -> None:
    digest = await _send_random(writer, args[0])
    writer.write(digest)
    await writer.drain()
    writer.write_eof()
    got, _ = await _read_all(reader)
    print(json.dumps({"downup_received": got.hex()}), flush=True)


async def _rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: list[int]) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


_SCENARIOS: dict[str, Any] = {
    "UP": _up,
    "DOWN": _down,
    "MIX": _mix,
    "BANNER": _banner,
    "CLOSEFIRST": _closefirst,
    "DOWNUP": _downup,
    "RST": _rst,
    "SLOWREAD": _slowread,
}


async def serve(address: str, port: int) -> None:
    server = await asyncio.start_server(_handle, address, port, limit=1 << 20, backlog=1024)
    print(json.dumps({"listening": port}), flush=True)
    async with server:
        await server.serve_forever()


# --- client ------------------------------------------------------------------------------


def _connect(address: str, port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection((address, port), timeout=timeout)
    sock.settimeout(120)
    return sock


def _recv_all(sock: socket.socket, delay: float = 0.0) -> bytes:
    parts = []
    while block := sock.recv(CHUNK if not delay else 8192):
        parts.append(block)
        if delay:
            time.sleep(delay)
    return b"".join(parts)


def _send_random_sync(sock: socket.socket, n: int) -> bytes:
    digest = hashlib.sha256()
    while n > 0:
        block = os.urandom(min(CHUNK, n))
        digest.update(block)
        sock.sendall(block)
        n -= len(block)
    return digest.digest()


def client_up(address: str, port: int, n: int, scenario: str = "UP") -> dict[str, Any]:
    with _connect(address, port) as sock:
        sock.sendall(f"{scenario} {n}\n".encode())
        start = time.monotonic()
        sent = _send_random_sync(sock, n)
        sock.shutdown(socket.SHUT_WR)
        got = _recv_all(sock)
        return {"ok": got == sent, "bytes": n, "seconds": time.monotonic() - start}


def client_down(address: str, port: int, n: int, slow: bool = False) -> dict[str, Any]:
    with _connect(address, port) as sock:
        sock.sendall(f"DOWN {n}\n".encode())
        start = time.monotonic()
        data = _recv_all(sock, delay=0.001 if slow else 0.0)
        body, digest = data[:-32], data[-32:]
        ok = len(body) == n and hashlib.sha256(body).digest() == digest
        return {"ok": ok, "bytes": len(body), "seconds": time.monotonic() - start}


async def _mix_one(address: str, port: int, up: int, down: int) -> bool:
    reader, writer = await asyncio.open_connection(address, port, limit=1 << 20)
    writer.write(f"MIX {up} {down}\n".encode())
    sent = hashlib.sha256()
    remaining = up
    while remaining > 0:
        block = os.urandom(min(65536, remaining))
        sent.update(block)
        writer.write(block)
        await writer.drain()
        remaining -= len(block)
    writer.write_eof()
    data = await reader.read(-1)
    writer.close()
    body, server_sent, server_got = data[:-64], data[-64:-32], data[-32:]
    return (
        len(body) == down
        and hashlib.sha256(body).digest() == server_sent
        and server_got == sent.digest()
    )


async def _down_one(address: str, port: int, n: int) -> bool:
    reader, writer = await asyncio.open_connection(address, port, limit=1 << 20)
    writer.write(f"DOWN {n}\n".encode())
    digest, count = hashlib.sha256(), 0
    tail = b""
    while block := await reader.read(CHUNK):
        data = tail + block
        body, tail = data[:-32], data[-32:]
        digest.update(body)
        count += len(body)
    writer.close()
    return count == n and digest.digest() == tail


async def _downs(address: str, port: int, n: int, count: int) -> dict[str, Any]:
    """`count` downloads of `n` bytes each at once, each checked against its digest."""
    results = await asyncio.gather(
        *(_down_one(address, port, n) for _ in range(count)), return_exceptions=True
    )
    failures = [repr(r) for r in results if r is not True]
    return {"ok": not failures, "downloads": count, "failures": failures[:5]}


async def _mix_many(address: str, port: int, count: int, seed: int) -> dict[str, Any]:
    import random

    rng = random.Random(seed)
    sizes = [
        (
            rng.choice([0, 1, rng.randrange(1, 1 << 20)]),
            rng.choice([0, 1, rng.randrange(1, 1 << 20)]),
        )
        for _ in range(count)
    ]
    results = await asyncio.gather(
        *(_mix_one(address, port, up, down) for up, down in sizes), return_exceptions=True
    )
    failures = [repr(r) for r in results if r is not True]
    return {"ok": not failures, "connections": count, "failures": failures[:5]}


def client_banner(address: str, port: int) -> dict[str, Any]:
    with _connect(address, port) as sock:
        sock.sendall(b"BANNER\n")
        banner = sock.recv(100)
        return {"ok": banner.startswith(b"220 "), "banner": banner.decode(errors="replace")}


def client_closefirst(address: str, port: int, n: int) -> dict[str, Any]:
    with _connect(address, port) as sock:
        sock.sendall(f"CLOSEFIRST {n}\n".encode())
        data = _recv_all(sock)
        ok = len(data) == n + 32 and hashlib.sha256(data[:n]).digest() == data[n:]
        return {"ok": ok, "bytes": len(data)}


def client_downup(address: str, port: int, n: int) -> dict[str, Any]:
    with _connect(address, port) as sock:
        sock.sendall(f"DOWNUP {n}\n".encode())
        data = _recv_all(sock)  # the server half-closed
        ok_down = len(data) == n + 32 and hashlib.sha256(data[:n]).digest() == data[n:]
        sent = _send_random_sync(sock, n)  # and still receives
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        tail = sock.recv(1)
        return {"ok": ok_down and tail == b"", "sent": sent.hex()}


def client_rst(address: str, port: int) -> dict[str, Any]:
    """Expect a reset: during the connect (it can win the race) or on the first read."""
    try:
        sock = _connect(address, port)
    except ConnectionResetError:
        return {"ok": True, "error": "ECONNRESET"}
    with sock:
        try:
            sock.sendall(b"RST\n")
            data = sock.recv(10)
        except ConnectionResetError:
            return {"ok": True, "error": "ECONNRESET"}
        return {"ok": False, "received": data.hex()}


def client_abort(address: str, port: int) -> dict[str, Any]:
    """Connect, start an upload, then abort with RST (the server must see a reset)."""
    sock = _connect(address, port)
    sock.sendall(b"UP 1000000\n" + os.urandom(1000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return {"ok": True}


def client_refused(address: str, port: int) -> dict[str, Any]:
    start = time.monotonic()
    try:
        socket.create_connection((address, port), timeout=30).close()
    except OSError as exc:
        return {
            "ok": isinstance(exc, ConnectionRefusedError),
            "error": repr(exc),
            "seconds": time.monotonic() - start,
        }
    return {"ok": False, "error": "connected"}


async def _try_connect(address: str, port: int, limit: float) -> tuple[str, float]:
    start = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), limit)
        writer.close()
        return "connected", time.monotonic() - start
    except TimeoutError:
        return "client-timeout", time.monotonic() - start
    except OSError as exc:
        return type(exc).__name__, time.monotonic() - start


async def _blackhole(
    dead: str, live: str, port: int, count: int, n: int, bound: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    pending = [asyncio.ensure_future(_try_connect(dead, port, bound)) for _ in range(count)]
    start = time.monotonic()
    transfer = await loop.run_in_executor(None, client_down, live, port, n)
    transfer_done = time.monotonic() - start
    dead_results = await asyncio.gather(*pending)
    return {
        "transfer_ok": transfer["ok"],
        "transfer_seconds": transfer_done,
        "dead_still_pending_at_transfer_end": sum(1 for _, t in dead_results if t > transfer_done),
        "dead_results": sorted({r for r, _ in dead_results}),
        "dead_max_seconds": max(t for _, t in dead_results),
    }


def main(argv: list[str]) -> int:
    command, address, port, *rest = argv
    p = int(port)
    args = [int(x) for x in rest if x.lstrip("-").isdigit()]
    if command == "server":
        asyncio.run(serve(address, p))
        return 0
    results: dict[str, Any]
    if command == "up":
        results = client_up(address, p, args[0])
    elif command == "slowread":
        results = client_up(address, p, args[0], "SLOWREAD")
    elif command == "down":
        results = client_down(address, p, args[0])
    elif command == "slowdown":
        results = client_down(address, p, args[0], slow=True)
    elif command == "downs":
        results = asyncio.run(_downs(address, p, args[0], args[1]))
    elif command == "mix":
        results = asyncio.run(_mix_many(address, p, args[0], args[1]))
    elif command == "banner":
        results = client_banner(address, p)
    elif command == "closefirst":
        results = client_closefirst(address, p, args[0])
    elif command == "downup":
        results = client_downup(address, p, args[0])
    elif command == "rst":
        results = client_rst(address, p)
    elif command == "abort":
        results = client_abort(address, p)
    elif command == "refused":
        results = client_refused(address, p)
    elif command == "blackhole":
        live, count, n, bound = rest[0], int(rest[1]), int(rest[2]), float(rest[3])
        results = asyncio.run(_blackhole(address, live, p, count, n, bound))
        results["ok"] = results["transfer_ok"]
    else:
        print(f"unknown command {command}", file=sys.stderr)
        return 2
    print(json.dumps(results), flush=True)
    return 0 if results.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

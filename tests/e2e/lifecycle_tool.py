"""Helpers run inside the simulator's namespaces by test_daemon_lifecycle.py.

lifecycle_tool.py echo ADDRESS PORT          echo server; prints "listening"
lifecycle_tool.py first-echo ADDRESS PORT LIMIT
    retry a fresh TCP connection + echo until one works or LIMIT seconds pass; prints
    {"ok": ..., "seconds": ..., "attempts": ..., "error": ...} (seconds since start)
lifecycle_tool.py hold ADDRESS PORT          open a connection, echo once, print "held",
                                             keep it open until killed
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time

ATTEMPT_TIMEOUT = 0.3
RETRY_PACING = 0.05


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def serve(address: str, port: int) -> None:
    server = await asyncio.start_server(_echo, address, port, reuse_address=True)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def echo_once(address: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((address, port), timeout=timeout)
    sock.sendall(b"hello\n")
    if sock.recv(100) != b"hello\n":
        sock.close()
        raise OSError("no echo")
    return sock


def first_echo(address: str, port: int, limit: float) -> int:
    start = time.monotonic()
    attempts, error = 0, ""
    while time.monotonic() - start < limit:
        attempts += 1
        try:
            echo_once(address, port, ATTEMPT_TIMEOUT).close()
        except OSError as exc:
            error = repr(exc)
            time.sleep(RETRY_PACING)  # pacing between attempts, not synchronisation
            continue
        seconds = round(time.monotonic() - start, 3)
        print(json.dumps({"ok": True, "seconds": seconds, "attempts": attempts}))
        return 0
    print(json.dumps({"ok": False, "seconds": limit, "attempts": attempts, "error": error}))
    return 1


def hold(address: str, port: int) -> int:
    sock = echo_once(address, port, 10.0)
    print("held", flush=True)
    signal.pause()
    sock.close()
    return 0


def main(argv: list[str]) -> int:
    command, address, port = argv[0], argv[1], int(argv[2])
    if command == "echo":
        asyncio.run(serve(address, port))
        return 0
    if command == "first-echo":
        return first_echo(address, port, float(argv[3]))
    if command == "hold":
        return hold(address, port)
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A UDP test peer run inside the simulator's namespaces (`python udp_tool.py ...`).

`server ADDR PORT [PORT...]` echoes every datagram back to its sender unchanged, except the
6-byte datagram ``whoami``, which it answers with the sender's address as it saw it
(``"HOST:PORT"``). It prints ``{"listening": ...}`` once bound and runs until stopped.

`sink ADDR PORT` receives and never answers, printing ``{"got": N}`` for each datagram.

Clients (each prints one JSON line with what it measured and exits 1 if something was
wrong; every wait has a deadline):

* ``echo HOST PORT SIZE COUNT``     one connected socket; COUNT random datagrams of SIZE
                                    bytes one after the other, each echoed byte for byte.
* ``many HOST PORT SOCKETS COUNT``  SOCKETS sockets at once, each sending COUNT distinct
                                    datagrams in lockstep; every answer is checked.
* ``whoami HOST PORT``              the address the server saw for this client.
* ``refused HOST PORT``             a connected socket sends until a receive fails with
                                    ConnectionRefusedError (an ICMP port unreachable).
* ``idle HOST PORT``                two sockets: prints ``{"idle": P, "busy": Q}`` (the
                                    source ports the server saw), then keeps the busy one
                                    talking until a line arrives on stdin, then asks
                                    again for both and prints the result.

Used only by tests/e2e; no external dependencies.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time
from typing import Any

WHOAMI = b"whoami"
RECV_SIZE = 65535
REPLY_TIMEOUT = 5.0
MANY_DEADLINE = 30.0
REFUSED_DEADLINE = 10.0
IDLE_DEADLINE = 30.0
BUSY_INTERVAL = 0.2


# --- server ------------------------------------------------------------------------------


def serve(address: str, ports: list[int]) -> None:
    selector = selectors.DefaultSelector()
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((address, port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    print(json.dumps({"listening": [address, ports]}), flush=True)
    while True:
        for key, _ in selector.select():
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            while True:
                try:
                    data, peer = ready.recvfrom(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # an ICMP error for an earlier reply: ignore it
                    continue
                reply = f"{peer[0]}:{peer[1]}".encode() if data == WHOAMI else data
                try:
                    ready.sendto(reply, peer)
                except OSError as exc:
                    print(json.dumps({"send_error": str(exc), "peer": list(peer)}), flush=True)


def sink(address: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    print(json.dumps({"listening": [address, [port]]}), flush=True)
    while True:
        data = sock.recv(RECV_SIZE)
        print(json.dumps({"got": len(data)}), flush=True)


# --- clients -----------------------------------------------------------------------------


def _connected(host: str, port: int, timeout: float = REPLY_TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def _ask(sock: socket.socket) -> str:
    sock.send(WHOAMI)
    return sock.recv(RECV_SIZE).decode()


def client_echo(host: str, port: int, size: int, count: int) -> dict[str, Any]:
    sock = _connected(host, port)
    start = time.monotonic()
    matched, errors = 0, []
    for _ in range(count):
        payload = os.urandom(size)
        try:
            sock.send(payload)
            reply = sock.recv(RECV_SIZE)
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if reply == payload:
            matched += 1
        else:
            errors.append(f"reply of {len(reply)} bytes differs from the {size} sent")
    return {
        "ok": matched == count,
        "matched": matched,
        "size": size,
        "errors": errors[:5],
        "seconds": time.monotonic() - start,
    }


def client_many(host: str, port: int, sockets: int, count: int) -> dict[str, Any]:
    """Every socket has one datagram in flight at a time; all sockets at once."""
    selector = selectors.DefaultSelector()
    expected: dict[socket.socket, bytes] = {}
    sent = dict.fromkeys(range(sockets), 0)
    index: dict[socket.socket, int] = {}

    def send_next(sock: socket.socket) -> None:
        n = index[sock]
        payload = f"socket {n} datagram {sent[n]} ".encode() + os.urandom(16 + n)
        sent[n] += 1
        expected[sock] = payload
        sock.send(payload)

    for n in range(sockets):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((host, port))
        index[sock] = n
        selector.register(sock, selectors.EVENT_READ)
    start = time.monotonic()
    for sock in index:
        send_next(sock)
    answered, wrong, errors = 0, 0, []
    deadline = start + MANY_DEADLINE
    while expected and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            try:
                reply = ready.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                selector.unregister(ready)
                expected.pop(ready, None)
                continue
            if reply == expected.get(ready):
                answered += 1
            else:
                wrong += 1
            if sent[index[ready]] < count:
                send_next(ready)
            else:
                del expected[ready]
                selector.unregister(ready)
    total = sockets * count
    return {
        "ok": answered == total and wrong == 0 and not errors,
        "answered": answered,
        "expected": total,
        "wrong": wrong,
        "unanswered_sockets": len(expected),
        "errors": errors[:5],
        "seconds": time.monotonic() - start,
    }


def client_whoami(host: str, port: int) -> dict[str, Any]:
    seen = _ask(_connected(host, port))
    return {"ok": True, "seen": seen}


def client_refused(host: str, port: int) -> dict[str, Any]:
    sock = _connected(host, port, timeout=0.5)
    start = time.monotonic()
    attempts = 0
    outcome = "no answer"
    while time.monotonic() - start < REFUSED_DEADLINE:
        attempts += 1
        try:
            sock.send(b"anyone there?")
            sock.recv(RECV_SIZE)
            outcome = "answered"
            break
        except ConnectionRefusedError:
            outcome = "ConnectionRefusedError"
            break
        except TimeoutError:
            continue
    return {
        "ok": outcome == "ConnectionRefusedError",
        "outcome": outcome,
        "attempts": attempts,
        "seconds": time.monotonic() - start,
    }


def client_idle(host: str, port: int) -> dict[str, Any]:
    idle, busy = _connected(host, port), _connected(host, port)
    idle_before, busy_before = _ask(idle), _ask(busy)
    print(json.dumps({"idle": idle_before, "busy": busy_before}), flush=True)
    busy_seen: set[str] = {busy_before}
    busy_asks, busy_errors = 1, []
    deadline = time.monotonic() + IDLE_DEADLINE
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    go = False
    while time.monotonic() < deadline:
        if selector.select(timeout=BUSY_INTERVAL):
            go = bool(sys.stdin.readline())
            break
        busy_asks += 1
        try:
            busy_seen.add(_ask(busy))
        except OSError as exc:
            busy_errors.append(f"{type(exc).__name__}: {exc}")
    idle_after = _ask(idle) if go else ""
    busy_seen.add(_ask(busy))
    return {
        "ok": go and idle_after != idle_before and busy_seen == {busy_before} and not busy_errors,
        "idle_before": idle_before,
        "idle_after": idle_after,
        "busy_seen": sorted(busy_seen),
        "busy_asks": busy_asks,
        "busy_errors": busy_errors[:5],
    }


def main(argv: list[str]) -> int:
    command, address, *rest = argv
    numbers = [int(x) for x in rest]
    if command == "server":
        serve(address, numbers)
        return 0
    if command == "sink":
        sink(address, numbers[0])
        return 0
    results: dict[str, Any]
    if command == "echo":
        results = client_echo(address, numbers[0], numbers[1], numbers[2])
    elif command == "many":
        results = client_many(address, numbers[0], numbers[1], numbers[2])
    elif command == "whoami":
        results = client_whoami(address, numbers[0])
    elif command == "refused":
        results = client_refused(address, numbers[0])
    elif command == "idle":
        results = client_idle(address, numbers[0])
    else:
        print(f"unknown command {command}", file=sys.stderr)
        return 2
    print(json.dumps(results), flush=True)
    return 0 if results.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

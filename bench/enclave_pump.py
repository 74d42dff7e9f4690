"""Micro-benchmark of the agent's frame pump through socketpairs (no root, no TAP).

A SOCK_SEQPACKET socketpair stands in for the TAP and a unix stream socketpair for the
link; feeders and drainers are separate processes so they do not share a GIL with the
pump. Usage: ``python bench/enclave_pump.py [SECONDS]``.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time

from nitro_netd.enclave.pump import run_pump
from nitro_netd.link import LinkProtocol, encode_frame

SIZES = (60, 1514, 9014, 65535)


def feed_tap(tap: socket.socket, frame: bytes) -> None:
    while True:
        tap.send(frame)


def feed_link(link: socket.socket, chunk: bytes) -> None:
    while True:
        link.sendall(chunk)


def measure(receive: socket.socket, seconds: float, messages: bool) -> tuple[float, float]:
    """Drain for `seconds`; return (units, bytes) per second (units = messages or bytes)."""
    buffer = bytearray(1 << 20)
    deadline = time.monotonic() + seconds
    count = nbytes = 0
    while time.monotonic() < deadline:
        n = receive.recv_into(buffer)
        count += 1
        nbytes += n
    return (count if messages else 0) / seconds, nbytes / seconds


def one_run(size: int, direction: str, seconds: float, protocol: LinkProtocol) -> str:
    tap_agent, tap_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link_agent, link_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (tap_agent, tap_test, link_agent, link_test):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    frame = os.urandom(size)
    if direction == "tap→link":
        feeder = multiprocessing.Process(target=feed_tap, args=(tap_test, frame), daemon=True)
    else:
        chunk = encode_frame(protocol, frame) * max(1, (1 << 20) // (size + 4))
        feeder = multiprocessing.Process(target=feed_link, args=(link_test, chunk), daemon=True)
    pump = multiprocessing.Process(
        target=run_pump, args=(tap_agent.fileno(), link_agent, protocol), daemon=True
    )
    pump.start()
    feeder.start()
    if direction == "tap→link":
        _, rate = measure(link_test, seconds, messages=False)
        fps = rate / (size + protocol.header_size)
    else:
        fps, rate = measure(tap_test, seconds, messages=True)
    for proc in (feeder, pump):
        proc.terminate()
        proc.join(5)
    for sock in (tap_agent, tap_test, link_agent, link_test):
        sock.close()
    return f"| {direction} | {size} | {fps / 1e3:.0f} k | {rate * 8 / 1e9:.2f} |"


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    multiprocessing.set_start_method("fork")
    print("| direction | frame bytes | frames/s | Gbit/s |\n| --- | --- | --- | --- |")
    for direction in ("tap→link", "link→tap"):
        for size in SIZES:
            print(one_run(size, direction, seconds, LinkProtocol.GVPROXY), flush=True)


if __name__ == "__main__":
    main()

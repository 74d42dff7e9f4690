"""The daemon's CPU per TCP round trip, in one process: no namespaces, no root, no scheduler.

The real daemon (`serve()`, with its defaults but busy polling off) runs on a unix link in
this process's event loop, next to an echo server on 127.0.0.1 and a fake agent that plays
the enclave's kernel with hand-built frames (no nitro_netd code, so an A/B run compares the
daemon alone). The agent opens one connection to 192.168.127.254 (the parent's loopback),
then sends 1-byte requests and waits for each echo: everything runs in one thread, so the
time per round trip is the CPU of both daemon passes, the fake agent, the echo server and
the kernel's loopback and unix sockets, without the wake-ups that dominate the simulator's
round trip. Use it to compare two source trees (medians of several runs):

    PYTHONPATH=/path/to/other/src python3 bench/inproc_rtt.py
    python3 bench/inproc_rtt.py --rounds 20000 --profile /tmp/rtt.prof

The figure varies with the machine; only ratios taken in the same session mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from nitro_netd.netstack import StackConfig
from nitro_netd.parent import DaemonConfig, serve
from nitro_netd.parent.daemon import keep_large_buffers_on_heap
from nitro_netd.transport import parse_endpoint

WARMUP = 1000
ENCLAVE_IP = bytes([192, 168, 127, 2])
HOST_ALIAS = bytes([192, 168, 127, 254])
CONNECT = (
    b"POST /connect HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n"
    b"Nitro-Netd-Version: 1\r\nNitro-Netd-Reply: 1\r\nNitro-Netd-Offload: csum, tso\r\n\r\n"
)
SYN, RST, ACK, PSH = 0x02, 0x04, 0x10, 0x08
SYN_OPTIONS = struct.pack("!BBHBBBB", 2, 4, 65480, 1, 3, 3, 7)
"""MSS 65480, NOP, window scale 7."""
_TCP = struct.Struct("!HHIIBBHHH")
_IP = struct.Struct("!BBHHHBBH4s4s")
Profiler = cProfile.Profile | None


def ip_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Echo(asyncio.Protocol):
    """The world's server: sends back what it gets."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class FakeAgent(asyncio.Protocol):
    """The enclave's side of the link: one TCP connection, 1-byte requests, one at a time."""

    def __init__(self, stack: StackConfig, port: int, rounds: int, profiler: Profiler) -> None:
        self.macs = stack.gateway_mac.octets + stack.enclave_mac.octets + b"\x08\x00"
        self.port, self.rounds, self.profiler = port, rounds, profiler
        self.snd, self.rcv, self.count = 1000, 0, 0
        self.head_seen = False
        self.pending = b""
        self.started = 0.0
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(why))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"the daemon closed the link: {exc or 'EOF'}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(CONNECT)

    def frame(self, flags: int, payload: bytes = b"", options: bytes = b"") -> bytes:
        words = 5 + len(options) // 4
        tcp = _TCP.pack(40000, self.port, self.snd, self.rcv, words << 4, flags, 65535, 0, 0)
        segment = tcp + options + payload  # TCP checksum left to offload (negotiated)
        ip = _IP.pack(0x45, 0, 20 + len(segment), 1, 0x4000, 64, 6, 0, ENCLAVE_IP, HOST_ALIAS)
        ip = ip[:10] + struct.pack("!H", ip_checksum(ip)) + ip[12:]
        frame = self.macs + ip + segment
        return struct.pack("<H", len(frame)) + frame

    def data_received(self, data: bytes) -> None:
        data = self.pending + data
        if not self.head_seen:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.pending = data
                return
            data, self.head_seen = data[end + 4 :], True
            self.transport.write(self.frame(SYN, options=SYN_OPTIONS))
            self.snd += 1
        while len(data) >= 2:
            (length,) = struct.unpack_from("<H", data)
            if len(data) < 2 + length:
                break
            frame, data = data[2 : 2 + length], data[2 + length :]
            self.on_frame(frame)
        self.pending = data

    def on_frame(self, frame: bytes) -> None:
        if frame[12:14] != b"\x08\x00" or frame[23] != 6:
            return  # ARP and the like
        (total,) = struct.unpack_from("!H", frame, 16)
        (seq,) = struct.unpack_from("!I", frame, 38)
        payload = total - 20 - (frame[46] >> 4) * 4
        if frame[47] & RST:
            self.fail("the connection was reset (is the echo server reachable?)")
        elif frame[47] & SYN:
            self.rcv = (seq + 1) & 0xFFFFFFFF
            self.transport.write(self.frame(ACK))
            self.request()
        elif payload > 0:
            self.rcv = (self.rcv + payload) & 0xFFFFFFFF
            self.count += 1
            if self.count == WARMUP:
                self.started = time.perf_counter()
                if self.profiler is not None:
                    self.profiler.enable()
            if self.count == WARMUP + self.rounds:
                if self.profiler is not None:
                    self.profiler.disable()
                self.done.set_result(time.perf_counter() - self.started)
                return
            self.request()

    def request(self) -> None:
        self.transport.write(self.frame(ACK | PSH, b"x"))
        self.snd += 1


async def measure(rounds: int, profile: Path | None) -> float:
    """Run the daemon and the fake agent; return microseconds per round trip."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stack = StackConfig()
    profiler = cProfile.Profile() if profile is not None else None
    try:
        with tempfile.TemporaryDirectory(prefix="nnd-rtt-") as folder:
            path = Path(folder) / "link.sock"
            config = DaemonConfig(
                listen=parse_endpoint(f"unix://{path}"), stack=stack, busy_poll=0.0
            )
            stop, ready = asyncio.Event(), asyncio.Event()
            daemon = asyncio.create_task(serve(config, stop, ready.set))
            await asyncio.wait(
                [daemon, asyncio.create_task(ready.wait())],
                timeout=10,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if daemon.done():
                daemon.result()  # raises the daemon's error
                raise RuntimeError("the daemon stopped before it was ready")
            if not ready.is_set():
                raise RuntimeError("the daemon was not ready within 10 s")
            transport, agent = await loop.create_unix_connection(
                lambda: FakeAgent(stack, port, rounds, profiler), str(path)
            )
            try:
                seconds = await asyncio.wait_for(agent.done, 60 + rounds / 1000)
            finally:
                transport.close()
                stop.set()
                await asyncio.wait_for(daemon, 10)
    finally:
        server.close()
    if profiler is not None and profile is not None:
        profiler.dump_stats(profile)
    return seconds / rounds * 1e6


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive, default=15000, help="timed round trips")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the timed rounds")
    args = parser.parse_args(argv)
    keep_large_buffers_on_heap()
    runner: Any = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        runner = uvloop.run
    per_round_trip = runner(measure(args.rounds, args.profile))
    print(f"{per_round_trip:.2f} us per round trip (in one process, {args.loop})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

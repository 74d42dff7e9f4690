"""The control socket and the status snapshot behind `nitro-netd status` and /metrics.

Theory of operation
-------------------
A named daemon listens on ``ROOT/NAME/control.sock`` (unix stream, mode 0660). The
protocol is one request line and one reply line, then the daemon closes:

    -> status\\n
    <- {"ok": true, "status": {...}}\\n          (an unknown request: {"ok": false, "error": ...})

A client that closes without a request line (a liveness probe) gets no reply.

The status object (`build_status`, ``"version": 1``) is plain JSON: daemon identity and
uptime, the link (up, peer, CID, since), the followed enclave (with ``error``: why the
last ``nitro-cli`` run failed, None while it works), exposed ports, flow counts
per protocol and the netstack's counters (frames and bytes each way, drops by reason).
Adding keys is compatible; renaming or removing one bumps the version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from nitro_netd.frames.ipv4 import IpProto
from nitro_netd.netstack import NetStack
from nitro_netd.parent.bridge import Bridge
from nitro_netd.parent.busy_poll import BusyPoll
from nitro_netd.parent.enclave_watch import EnclaveWatcher
from nitro_netd.parent.expose import ExposeSpec
from nitro_netd.parent.host_tcp import HostTcp

logger = logging.getLogger(__name__)

STATUS_VERSION: Final = 1
REQUEST_TIMEOUT: Final = 5.0
MAX_REQUEST: Final = 1024
SOCKET_MODE: Final = 0o660

Status = dict[str, Any]


@dataclass(slots=True)
class StatusInputs:
    """What the daemon knows that goes into a status snapshot."""

    bridge: Bridge
    listen: str
    name: str | None = None
    exposes: tuple[ExposeSpec, ...] = ()
    watcher: EnclaveWatcher | None = None
    pcap: str | None = None
    started: float = 0.0
    """Wall-clock start time."""
    started_monotonic: float = 0.0
    host_tcp: HostTcp | None = None
    state_dir: str | None = None
    """``STATE_DIR/NAME`` (``.../default`` without --enclave-name); None: no state."""


def flow_count(layer: object) -> int:
    """A layer's live flows: its `flow_count()` if it has one, else `len(layer.flows)`."""
    counter = getattr(layer, "flow_count", None)
    if callable(counter):
        return int(counter())
    flows = getattr(layer, "flows", None)
    return len(flows) if flows is not None else 0


def flow_counts(stack: NetStack) -> dict[str, int]:
    """Live flows per protocol name ("tcp", "udp", "icmp")."""
    out: dict[str, int] = {}
    for protocol, layer in sorted(stack.layers.items()):
        try:
            name = IpProto(protocol).name.lower()
        except ValueError:
            name = str(protocol)
        out[name] = flow_count(layer)
    return out


def build_status(inputs: StatusInputs, *, now: float, monotonic: float) -> Status:
    """The status snapshot (see the module docstring)."""
    link = inputs.bridge.link
    return {
        "version": STATUS_VERSION,
        "name": inputs.name,
        "state_dir": inputs.state_dir,
        "pid": os.getpid(),
        "started": inputs.started,
        "uptime": round(monotonic - inputs.started_monotonic, 3),
        "listen": inputs.listen,
        "link": {
            "up": link.up,
            "peer": link.peer,
            "cid": link.cid,
            "since": link.since,
            "accepted": link.accepted,
            "refused": link.refused,
        },
        "enclave": _enclave_status(inputs),
        "exposed": [
            {"protocol": e.protocol, "parent_port": e.parent_port, "enclave_port": e.enclave_port}
            for e in inputs.exposes
        ],
        "flows": flow_counts(inputs.bridge.stack),
        "counters": inputs.bridge.stack.stats.snapshot(),
        "pcap": inputs.pcap,
        "busy_poll": _busy_poll_status(inputs.bridge.busy_poll),
        "splice": _splice_status(inputs.host_tcp),
        "time": now,
    }


def _busy_poll_status(busy_poll: BusyPoll | None) -> dict[str, Any]:
    if busy_poll is None:
        return {"window_us": 0, "seconds": 0.0, "windows": 0}
    return {
        "window_us": round(busy_poll.window * 1e6),
        "seconds": round(busy_poll.spun, 6),
        "windows": busy_poll.windows,
    }


def _splice_status(host_tcp: HostTcp | None) -> dict[str, Any]:
    if host_tcp is None:
        return {"enabled": False, "limit": 0, "flows": 0, "stopped": 0, "bytes": 0}
    return {
        "enabled": host_tcp.splice_enabled,
        "limit": host_tcp.splice_limit,
        "flows": host_tcp.spliced_flows,
        "stopped": host_tcp.splice_stops,
        "bytes": host_tcp.spliced_bytes,
    }


def _enclave_status(inputs: StatusInputs) -> dict[str, Any]:
    watcher = inputs.watcher
    current = watcher.current if watcher else None
    return {
        "name": inputs.name,
        "following": watcher is not None,
        "nitro_cli": watcher.nitro_cli if watcher else None,
        "cid": current.cid if current else None,
        "state": current.state if current else None,
        "error": watcher.error if watcher else None,
    }


class ControlServer:
    """Serves status requests on a unix socket; see the module docstring."""

    def __init__(self, path: Path, get_status: Callable[[], Status]) -> None:
        self.path = path
        self._get_status = get_status
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen (replacing a stale socket file: we hold the pidfile lock).

        Raises:
            OSError: the socket cannot be bound (message names it).
        """
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
            os.chmod(self.path, SOCKET_MODE)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot open control socket {self.path}: {exc.strerror}"
            ) from exc

    async def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                answer = await self._read_request(reader)
            if answer is not None:
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (OSError, TimeoutError) as exc:
            logger.debug("control client: %s", exc)
        finally:
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        """The answer to the client's request line; None for a client that closed without
        one (`nitro-netd status` checking that a daemon is alive)."""
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):  # no newline within the limit
            return {"ok": False, "error": "request line too long"}
        return self.answer(line[:MAX_REQUEST]) if line else None

    def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line."""
        request = line.decode(errors="replace").strip()
        if request == "status":
            return {"ok": True, "status": self._get_status()}
        return {"ok": False, "error": f"unknown request {request[:40]!r}; try 'status'"}


def status_getter(inputs: StatusInputs) -> Callable[[], Status]:
    """A zero-argument snapshot function over `inputs`, reading the clocks."""
    return lambda: build_status(inputs, now=time.time(), monotonic=time.monotonic())

"""Exposed ports: `--expose PARENT[:ENCLAVE]` specs, and the listeners that carry them in.

Grammar (the original tool's spelling, plus passt-style ranges and a UDP prefix):

    SPEC   := [PROTO ":"] PORTS [":" PORTS]
    PROTO  := "tcp" | "udp"            (default tcp)
    PORTS  := PORT | PORT "-" PORT     (a range; both sides of a mapping equally long)

`80` exposes parent port 80 as enclave port 80; `8080:80` parent 8080 to enclave 80;
`8000-8009:9000-9009` ten ports; `udp:5353` a UDP port.

Each TCP listener binds 0.0.0.0:PARENT (the parent's localhost and eth0). An accepted
client becomes a flow the netstack opens towards the enclave (`TcpAccepted`); while no
enclave link is up, clients are reset at once instead of waiting for a timeout (logged at
most once per 10 s: anyone who can reach the port could flood the log).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from itertools import count
from typing import Final

from nitro_netd.netstack.events import SHELL_FLOW_BASE, HostEvent, TcpAccepted, UdpInbound, UdpReply
from nitro_netd.parent.host import ThrottledWarning, descriptor_hint
from nitro_netd.parent.lifecycle import running_as_root

logger = logging.getLogger(__name__)

BIND_ADDRESS: Final = "0.0.0.0"
BACKLOG: Final = 1024
ACCEPT_BACKOFF: Final = 1.0
"""Seconds an exposed port is not accepted on after running out of descriptors or memory."""
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ExposeError(ValueError):
    """An --expose spec that cannot be used; the message names the spec."""


@dataclass(frozen=True, slots=True)
class ExposeSpec:
    """One exposed port."""

    protocol: str
    parent_port: int
    enclave_port: int

    def __str__(self) -> str:
        return f"{self.protocol}:{self.parent_port}:{self.enclave_port}"


def _parse_ports(spec: str, text: str) -> range:
    first, sep, last = text.partition("-")
    try:
        low, high = int(first), int(last) if sep else int(first)
    except ValueError:
        raise ExposeError(
            f"--expose {spec!r}: {text!r} is not a port or a range like 8000-8010"
        ) from None
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise ExposeError(f"--expose {spec!r}: ports must be between 1 and 65535")
    if high < low:
        raise ExposeError(f"--expose {spec!r}: range {text!r} runs backwards")
    return range(low, high + 1)


def parse_expose(spec: str) -> list[ExposeSpec]:
    """Parse one --expose value into the ports it exposes.

    Raises:
        ExposeError: malformed, out of range, or mismatched range lengths.
    """
    parts = spec.strip().split(":")
    protocol = "tcp"
    if parts and parts[0].lower() in ("tcp", "udp"):
        protocol = parts.pop(0).lower()
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise ExposeError(f"--expose {spec!r}: expected PARENT[:ENCLAVE], e.g. 8080:80 or udp:53")
    parent = _parse_ports(spec, parts[0])
    enclave = _parse_ports(spec, parts[-1])
    if len(parent) != len(enclave):
        raise ExposeError(
            f"--expose {spec!r}: ranges of {len(parent)} and {len(enclave)} ports differ"
        )
    return [ExposeSpec(protocol, p, e) for p, e in zip(parent, enclave, strict=True)]


def parse_exposes(specs: Iterable[str]) -> tuple[ExposeSpec, ...]:
    """Parse every --expose value; refuse a parent port exposed twice.

    Raises:
        ExposeError: the first bad or duplicate spec.
    """
    seen: dict[tuple[str, int], str] = {}
    out: list[ExposeSpec] = []
    for spec in specs:
        for item in parse_expose(spec):
            key = (item.protocol, item.parent_port)
            if key in seen:
                raise ExposeError(
                    f"--expose {spec!r}: {item.protocol} port {item.parent_port} is already exposed by {seen[key]!r}"
                )
            seen[key] = spec
            out.append(item)
    return tuple(out)


def bind_exposed(item: ExposeSpec) -> socket.socket:
    """Bind one exposed port (and listen, for TCP), non-blocking.

    Raises:
        OSError: with a message naming the port (e.g. already in use).
    """
    tcp = item.protocol == "tcp"
    sock: socket.socket | None = None
    try:  # a wide range can run out of descriptors at the socket itself
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        if tcp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((BIND_ADDRESS, item.parent_port))
        if tcp:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise OSError(
            exc.errno,
            f"cannot expose {item.protocol} port {item.parent_port}: {exc.strerror}"
            f"{_bind_hint(exc, item)}",
        ) from exc
    return sock


def _bind_hint(exc: OSError, item: ExposeSpec) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f" (something else listens there: see ss -lnp 'sport = :{item.parent_port}';"
            " stop it or expose another parent port)"
        )
    if exc.errno == errno.EACCES and item.parent_port < 1024:
        who = "" if running_as_root() else "root or "
        return f" (ports below 1024 need {who}CAP_NET_BIND_SERVICE)"
    return descriptor_hint(exc)


def bind_all(items: Sequence[ExposeSpec], protocol: str) -> list[tuple[socket.socket, ExposeSpec]]:
    """Bind every item of `protocol`, all or nothing.

    Raises:
        OSError: the first port that could not be bound; the others are closed again.
    """
    bound: list[tuple[socket.socket, ExposeSpec]] = []
    try:
        for item in items:
            if item.protocol == protocol:
                bound.append((bind_exposed(item), item))
    except OSError:
        for sock, _ in bound:
            sock.close()
        raise
    return bound


class TcpExposer:
    """Accepts clients on exposed TCP ports and hands them to the bridge as flows."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        adopt: Callable[[int, socket.socket], None],
        post_event: Callable[[HostEvent], None],
        link_up: Callable[[], bool],
    ) -> None:
        self.loop = loop
        self._adopt = adopt
        self._post = post_event
        self._link_up = link_up
        self._flow_ids = count(SHELL_FLOW_BASE)
        self.listeners: dict[int, tuple[socket.socket, ExposeSpec]] = {}
        self._backoffs: dict[int, asyncio.TimerHandle] = {}
        """Listeners not watched for a while after running out of descriptors."""
        self.no_link_log = ThrottledWarning(logger)
        """Logs clients reset while no link is up (throttled: anyone can connect)."""

    def open(self, items: Sequence[ExposeSpec]) -> None:
        """Bind every TCP item (all or nothing) and start accepting.

        Raises:
            OSError: a port could not be bound; nothing stays bound.
        """
        bound = bind_all(items, "tcp")
        for sock, item in bound:
            self.listeners[sock.fileno()] = (sock, item)
            self.loop.add_reader(sock.fileno(), self._on_acceptable, sock, item)
            logger.info(
                "exposing tcp port %d -> enclave port %d", item.parent_port, item.enclave_port
            )

    def _on_acceptable(self, listener: socket.socket, item: ExposeSpec) -> None:
        for _ in range(64):
            try:
                client, (address, port) = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._back_off(listener, item, exc)
                    return
                logger.warning("accept on port %d failed: %s", item.parent_port, exc)
                continue
            self._hand_over(client, address, port, item)

    def _back_off(self, listener: socket.socket, item: ExposeSpec, exc: OSError) -> None:
        """Out of descriptors or memory: the waiting client keeps the listener readable, so
        stop watching it for `ACCEPT_BACKOFF` seconds instead of spinning on it."""
        fd = listener.fileno()
        self.loop.remove_reader(fd)
        logger.warning(
            "accept on port %d failed: %s; not accepting for %.0f s%s",
            item.parent_port,
            exc,
            ACCEPT_BACKOFF,
            descriptor_hint(exc),
        )
        self._backoffs[fd] = self.loop.call_later(ACCEPT_BACKOFF, self._resume, listener, item)

    def _resume(self, listener: socket.socket, item: ExposeSpec) -> None:
        fd = listener.fileno()
        if self._backoffs.pop(fd, None) is not None and fd in self.listeners:
            self.loop.add_reader(fd, self._on_acceptable, listener, item)

    def _hand_over(self, client: socket.socket, address: str, port: int, item: ExposeSpec) -> None:
        if not self._link_up():
            self.no_link_log.warn(
                "[tcp %s:%d→:%d] no enclave link: client reset", address, port, item.enclave_port
            )
            client.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            client.close()
            return
        flow = next(self._flow_ids)
        self._adopt(flow, client)
        self._post(TcpAccepted(flow, IPv4Address(address), port, item.enclave_port))

    def close(self) -> None:
        """Stop listening."""
        for timer in self._backoffs.values():
            timer.cancel()
        self._backoffs.clear()
        for fd, (sock, _) in list(self.listeners.items()):
            self.loop.remove_reader(fd)
            sock.close()
        self.listeners.clear()


class UdpExposer:
    """Exposed UDP ports: client datagrams go in as `UdpInbound`; `UdpReply` goes back out.

    Implements `HostSide` for `UdpReply`. The listeners outlive enclave links.
    """

    command_types: tuple[type, ...] = (UdpReply,)
    READ_BATCH: Final = 64

    def __init__(
        self, loop: asyncio.AbstractEventLoop, post_event: Callable[[HostEvent], None]
    ) -> None:
        self.loop = loop
        self._post = post_event
        self.sockets: dict[int, tuple[socket.socket, ExposeSpec]] = {}
        self._buffer = bytearray(65536)
        self._paused = False

    def open(self, items: Sequence[ExposeSpec]) -> None:
        """Bind every UDP item (all or nothing).

        Raises:
            OSError: a port could not be bound; nothing stays bound.
        """
        bound = bind_all(items, "udp")
        for sock, item in bound:
            self.sockets[item.parent_port] = (sock, item)
            self.loop.add_reader(sock.fileno(), self._on_readable, sock, item)
            logger.info(
                "exposing udp port %d -> enclave port %d", item.parent_port, item.enclave_port
            )

    def _on_readable(self, sock: socket.socket, item: ExposeSpec) -> None:
        view = memoryview(self._buffer)
        for _ in range(self.READ_BATCH):
            try:
                size, (address, port) = sock.recvfrom_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.debug("udp port %d: %s", item.parent_port, exc)
                return
            event = UdpInbound(
                item.parent_port, IPv4Address(address), port, item.enclave_port, bytes(view[:size])
            )
            self._post(event)

    def execute(self, command: UdpReply) -> None:
        """Send the enclave's reply to the client from the exposed port."""
        entry = self.sockets.get(command.parent_port)
        if entry is None:
            return
        try:
            entry[0].sendto(command.data, (str(command.address), command.port))
        except OSError as exc:
            logger.debug(
                "udp port %d: reply to %s:%d: %s",
                command.parent_port,
                command.address,
                command.port,
                exc,
            )

    def set_link_paused(self, paused: bool) -> None:
        """Stop reading clients while the link to the enclave is backed up."""
        if paused == self._paused:
            return
        self._paused = paused
        for sock, item in self.sockets.values():
            if paused:
                self.loop.remove_reader(sock.fileno())
            else:
                self.loop.add_reader(sock.fileno(), self._on_readable, sock, item)

    def close_all(self) -> None:
        """Listeners stay across enclave links: nothing to close."""

    def close(self) -> None:
        """Stop listening."""
        for sock, _ in self.sockets.values():
            if not self._paused:
                self.loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets.clear()

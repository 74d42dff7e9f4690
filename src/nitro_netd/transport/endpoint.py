"""Link endpoints from URLs: ``vsock://CID:PORT``, ``vsock://:PORT`` and ``unix:///path``.

An endpoint is parsed once, then opened to listen (the daemon) or to connect (the agent).
The vsock code is never exercised on development or CI machines (their vsock device
belongs to the machine's host); tests use unix endpoints and check vsock by parsing and
by the socket options it would set.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import urlsplit

VMADDR_CID_ANY: Final = 0xFFFFFFFF
VMADDR_CID_HOST: Final = 2
PARENT_CID: Final = 3
"""In a Nitro Enclave the parent instance is always CID 3."""
DEFAULT_PORT: Final = 1024
MAX_UNIX_PATH: Final = 107
"""The longest unix socket path Linux takes: ``sun_path`` is 108 bytes with its NUL."""
LINK_BUFFER_BYTES: Final = 8 << 20
"""Socket buffers for the link: several MiB on both ends (PERF-NOTES.md)."""

# Not exported by every Python build; values from <linux/vm_sockets.h>.
SO_VM_SOCKETS_BUFFER_SIZE: Final = getattr(socket, "SO_VM_SOCKETS_BUFFER_SIZE", 0)
SO_VM_SOCKETS_BUFFER_MAX_SIZE: Final = getattr(socket, "SO_VM_SOCKETS_BUFFER_MAX_SIZE", 2)
AF_VSOCK: Final = getattr(socket, "AF_VSOCK", 40)
SO_SNDBUFFORCE: Final = 32
SO_RCVBUFFORCE: Final = 33
"""<asm-generic/socket.h>: set buffers past net.core.[rw]mem_max (needs CAP_NET_ADMIN)."""


class EndpointError(ValueError):
    """A transport URL that cannot be used, with what to write instead."""


class Scheme(enum.Enum):
    """The kinds of stream a link can run over."""

    VSOCK = "vsock"
    UNIX = "unix"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed transport URL."""

    scheme: Scheme
    cid: int | None = None
    """vsock: the peer's CID to connect to, or None to listen on any CID."""
    port: int = DEFAULT_PORT
    path: str = ""
    """unix: the socket's file path."""

    def __str__(self) -> str:
        if self.scheme is Scheme.UNIX:
            return f"unix://{self.path}"
        return f"vsock://{'' if self.cid is None else self.cid}:{self.port}"


_HINT: Final = "use vsock://:PORT (listen), vsock://CID:PORT (connect) or unix:///absolute/path"


def parse_endpoint(url: str) -> Endpoint:
    """Parse a transport URL.

    Raises:
        EndpointError: unknown scheme, bad CID or port, or a unix path that is relative or
            longer than `MAX_UNIX_PATH` bytes.
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = parts.netloc + parts.path
        if not path.startswith("/") or parts.netloc:
            raise EndpointError(f"{url!r}: unix path must be absolute (unix:///path); {_HINT}")
        size = len(os.fsencode(path))
        if size > MAX_UNIX_PATH:
            raise EndpointError(
                f"{url!r}: the unix socket path is {size} bytes, longer than the "
                f"{MAX_UNIX_PATH} a unix socket address can hold; use a shorter path"
            )
        return Endpoint(Scheme.UNIX, path=path)
    if parts.scheme == "vsock":
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise EndpointError(f"{url!r}: a vsock URL has no path; {_HINT}")
        return _parse_vsock_netloc(url, parts.netloc)
    raise EndpointError(f"{url!r}: unknown transport; {_HINT}")


def _parse_vsock_netloc(url: str, netloc: str) -> Endpoint:
    cid_text, sep, port_text = netloc.rpartition(":")
    if not sep:
        cid_text, port_text = netloc, str(DEFAULT_PORT)
    try:
        port = int(port_text)
        cid = int(cid_text) if cid_text else None
    except ValueError:
        raise EndpointError(f"{url!r}: CID and port must be numbers; {_HINT}") from None
    if not 0 <= port <= 0xFFFFFFFF:
        raise EndpointError(f"{url!r}: vsock port {port} out of range 0..4294967295")
    if cid is not None and not 0 <= cid < VMADDR_CID_ANY:
        raise EndpointError(f"{url!r}: CID {cid} out of range")
    return Endpoint(Scheme.VSOCK, cid=cid, port=port)


def vsock_socket_options(buffer_bytes: int = LINK_BUFFER_BYTES) -> list[tuple[int, int, int]]:
    """Return the (level, option, value) settings applied to a vsock link socket."""
    return [
        (AF_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE, buffer_bytes),
        (AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, buffer_bytes),
    ]


class TunableSocket(Protocol):
    """What `tune_link_socket` needs of a socket: a `socket.socket`, or the stand-in an
    asyncio (or uvloop) transport gives for its socket."""

    @property
    def family(self) -> int: ...

    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...


def tune_link_socket(sock: TunableSocket, buffer_bytes: int = LINK_BUFFER_BYTES) -> None:
    """Give a link socket large buffers (forced past the sysctl caps when we may)."""
    if sock.family == AF_VSOCK:
        for level, option, value in vsock_socket_options(buffer_bytes):
            sock.setsockopt(level, option, value)
        return
    for forced, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, buffer_bytes)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, buffer_bytes)


NO_VSOCK_ENV: Final = "NITRO_NETD_NO_VSOCK"
"""Set (to anything but empty) where AF_VSOCK must never be opened: the test suite sets it
for itself and every process it starts, because a development or CI machine's vsock device
belongs to the machine's host (a test gone wrong must fail, not talk to it)."""


def vsock_socket() -> socket.socket:
    """A new AF_VSOCK stream socket, unless `NO_VSOCK_ENV` forbids it.

    Raises:
        OSError: EPERM when forbidden; whatever the kernel says otherwise.
    """
    if os.environ.get(NO_VSOCK_ENV):
        raise OSError(errno.EPERM, f"AF_VSOCK is forbidden here ({NO_VSOCK_ENV} is set)")
    return socket.socket(AF_VSOCK, socket.SOCK_STREAM)


def open_listener(endpoint: Endpoint, backlog: int = 8) -> socket.socket:
    """Bind and listen on `endpoint`; a stale unix socket file is replaced.

    Raises:
        OSError: with a message naming the endpoint.
    """
    if endpoint.scheme is Scheme.UNIX:
        _remove_stale_unix_socket(endpoint.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[int, int] = endpoint.path
    else:
        sock = vsock_socket()
        address = (VMADDR_CID_ANY if endpoint.cid is None else endpoint.cid, endpoint.port)
    try:
        tune_link_socket(sock)  # an accepted vsock socket inherits these; a unix one does not
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {endpoint}: {exc.strerror}") from exc
    return sock


def _remove_stale_unix_socket(path: str) -> None:
    """Unlink `path` if it is a socket nobody listens on; refuse to touch other files."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(17, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(
        98,
        f"{path} is in use by another listener (another nitro-netd-parent? stop it, or"
        " pass another --listen)",
    )


def tune_accepted_link_socket(sock: TunableSocket) -> None:
    """Give a link socket the daemon accepted the link's buffers, where it did not inherit
    them from the listener: a unix socket starts with the system defaults (``wmem_default``,
    208 KiB on most machines), which capped the bytes in flight to the agent and cost every
    stream to the enclave about 11 % in the simulator. An accepted vsock socket already has its
    listener's sizes and is left alone.

    Raises:
        OSError: the buffers could not be set.
    """
    if sock.family == socket.AF_UNIX:
        tune_link_socket(sock)


def connect(endpoint: Endpoint, timeout: float | None = None) -> socket.socket:
    """Open a connected, tuned, blocking stream socket to `endpoint`.

    Raises:
        OSError: the connect failed (refused, no such file, timeout...).
    """
    if endpoint.scheme is Scheme.UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[int, int] = endpoint.path
    else:
        if endpoint.cid is None:
            raise EndpointError(f"{endpoint}: a CID is needed to connect (vsock://3:PORT)")
        sock = vsock_socket()
        address = (endpoint.cid, endpoint.port)
    try:
        tune_link_socket(sock)
        sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
    except OSError:
        sock.close()
        raise
    return sock


def peer_cid(sock: socket.socket) -> int | None:
    """Return the vsock CID of the peer of an accepted socket, or None for unix links."""
    if sock.family != AF_VSOCK:
        return None
    cid, _port = sock.getpeername()
    return int(cid)

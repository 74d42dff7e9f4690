"""Transport URLs parsed into endpoints (no sockets opened)."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import pytest

from nitro_netd.cli import parent as parent_cli
from nitro_netd.transport import EndpointError, Scheme, parse_endpoint
from nitro_netd.transport.endpoint import (
    AF_VSOCK,
    LINK_BUFFER_BYTES,
    MAX_UNIX_PATH,
    NO_VSOCK_ENV,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    connect,
    open_listener,
    tune_accepted_link_socket,
)


def unix_path(size: int) -> str:
    """An absolute path of `size` bytes."""
    return "/" + "s" * (size - 1)


def test_unix_endpoint_path_up_to_the_sun_path_limit_is_kept() -> None:
    endpoint = parse_endpoint(f"unix://{unix_path(MAX_UNIX_PATH)}")
    assert endpoint.scheme is Scheme.UNIX
    assert len(endpoint.path) == MAX_UNIX_PATH == 107


@pytest.mark.parametrize(
    "path", [unix_path(108), unix_path(300), "/" + "é" * 54], ids=["108", "300", "multibyte"]
)
def test_unix_endpoint_path_longer_than_sun_path_is_refused_when_parsed(path: str) -> None:
    """sun_path holds 108 bytes with its NUL; bytes count, not characters ("é" is two)."""
    with pytest.raises(EndpointError) as info:
        parse_endpoint(f"unix://{path}")
    message = str(info.value)
    assert f"is {len(path.encode())} bytes, longer than the 107" in message
    assert "shorter path" in message


def test_daemon_refuses_a_listen_path_too_long_for_a_socket() -> None:
    """The daemon used to fail at bind time with "cannot listen on ...: None"."""
    args = parent_cli.build_parser().parse_args(["--listen", f"unix://{unix_path(200)}"])
    with pytest.raises(EndpointError, match="200 bytes, longer than the 107"):
        parent_cli.build_config(args)


def test_the_suite_forbids_vsock_for_itself_and_what_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tests/conftest.py sets NITRO_NETD_NO_VSOCK: a listener or connect to a vsock URL
    fails with EPERM before any AF_VSOCK socket exists (the machine's vsock belongs to its
    host)."""
    assert os.environ.get(NO_VSOCK_ENV)
    opened: list[object] = []

    def refusing_socket(*args: Any, **kwargs: Any) -> socket.socket:
        opened.append(args)  # (and never a real one: should the guard break, this fails)
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", refusing_socket)
    with pytest.raises(OSError, match=NO_VSOCK_ENV) as info:
        connect(parse_endpoint("vsock://3:1024"))
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError, match=NO_VSOCK_ENV) as info:
        open_listener(parse_endpoint("vsock://:1024"))
    assert info.value.errno == errno.EPERM
    assert opened == []


class RecordingSocket:
    """A stand-in socket that records the options set on it."""

    def __init__(self, family: int) -> None:
        self.family = family
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, optname: int, value: int, /) -> None:
        self.options.append((level, optname, value))


def test_an_accepted_unix_link_socket_gets_the_link_buffers() -> None:
    sock = RecordingSocket(socket.AF_UNIX)
    tune_accepted_link_socket(sock)
    assert sock.options == [
        (socket.SOL_SOCKET, SO_SNDBUFFORCE, LINK_BUFFER_BYTES),
        (socket.SOL_SOCKET, SO_RCVBUFFORCE, LINK_BUFFER_BYTES),
    ]


def test_an_accepted_vsock_link_socket_keeps_what_it_inherited() -> None:
    sock = RecordingSocket(AF_VSOCK)
    tune_accepted_link_socket(sock)
    assert sock.options == []

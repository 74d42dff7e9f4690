"""TAP creation: the ifreq layout, offload ioctls and one-line errors (no real device)."""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

import pytest

from nitro_netd.enclave import tap
from nitro_netd.enclave.tap import (
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    TapError,
    build_ifreq,
    build_mtu_ifreq,
    has_vnet_hdr,
    open_tap,
    set_mtu,
    set_offload,
)


def test_tap_ifreq_layout() -> None:
    ifreq = build_ifreq("tap0")
    assert len(ifreq) == 40
    name, flags = struct.unpack_from("16sH", ifreq)
    assert name.rstrip(b"\0") == b"tap0"
    assert flags == IFF_TAP | IFF_NO_PI | IFF_VNET_HDR == 0x5002


def _ioc(direction: int, kind: str, number: int, size: int) -> int:
    """<asm-generic/ioctl.h>'s _IOC."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | number


def test_tap_ioctl_numbers() -> None:
    write, read = 1, 2
    assert _ioc(write, "T", 202, 4) == tap.TUNSETIFF
    assert _ioc(write, "T", 208, 4) == tap.TUNSETOFFLOAD == 0x400454D0
    assert _ioc(read, "T", 210, 4) == tap.TUNGETIFF
    assert (tap.TUN_F_CSUM, tap.TUN_F_TSO4, tap.VNET_HDR_SIZE) == (0x01, 0x02, 10)


def test_tap_has_vnet_hdr_is_false_for_anything_but_a_tap() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_fd, write_fd = os.pipe()
    try:
        assert has_vnet_hdr(left.fileno()) is False
        assert has_vnet_hdr(read_fd) is False
    finally:
        for fd in (read_fd, write_fd):
            os.close(fd)
        left.close()
        right.close()


def test_tap_set_offload_on_a_non_tap_raises_oserror() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right, pytest.raises(OSError, match="ioctl"):
        set_offload(left.fileno(), tap.TUN_F_CSUM)


def test_tap_mtu_ifreq_layout() -> None:
    """``struct ifreq`` with ``ifr_mtu``: the name, then an int where the union starts."""
    ifreq = build_mtu_ifreq("tap0", 1500)
    assert len(ifreq) == 40
    name, mtu = struct.unpack_from("16si", ifreq)
    assert (name.rstrip(b"\0"), mtu) == (b"tap0", 1500)
    assert tap.SIOCSIFMTU == 0x8922  # <linux/sockios.h>


def test_tap_set_mtu_on_a_non_tap_raises_oserror() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right, pytest.raises(OSError, match="ioctl"):  # TUNGETIFF: not a TAP
        set_mtu(left.fileno(), 1500)


@pytest.mark.parametrize("name", ["", "a" * 16, "tâp", "a/b", "a b", "a:b", "tap\t0", ".", ".."])
def test_tap_ifreq_rejects_bad_names(name: str) -> None:
    with pytest.raises(TapError, match="interface name"):
        build_ifreq(name)


def test_tap_missing_tun_device_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(TapError, match="modprobe tun") as info:
        open_tap("tap0", tun_path=str(tmp_path / "no-such-tun"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("code", "advice"),
    [(errno.EPERM, "run as root"), (errno.EACCES, "run as root"), (errno.EBUSY, "busy")],
)
def test_tap_errors_become_one_line_advice(
    monkeypatch: pytest.MonkeyPatch, code: int, advice: str
) -> None:
    def refuse(path: str, flags: int) -> int:
        raise OSError(code, "refused")

    monkeypatch.setattr("nitro_netd.enclave.tap.os.open", refuse)
    with pytest.raises(TapError, match=advice):
        open_tap("tap0")

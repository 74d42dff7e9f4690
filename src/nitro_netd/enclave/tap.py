"""Create the enclave's TAP device from ``/dev/net/tun`` (no packet-info header).

The returned file descriptor *is* the device: the kernel removes a non-persistent TAP when
its last descriptor closes, so the agent opens it once and keeps it for its whole life,
across link sessions.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Final

TUN_PATH: Final = "/dev/net/tun"
TUNSETIFF: Final = 0x400454CA
"""<linux/if_tun.h>: _IOW('T', 202, int)."""
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFNAMSIZ: Final = 16
DEFAULT_TAP_NAME: Final = "tap0"


class TapError(Exception):
    """The TAP device cannot be created; the message says what to do."""


def build_ifreq(name: str, flags: int = IFF_TAP | IFF_NO_PI) -> bytes:
    """Return a ``struct ifreq`` naming the interface and carrying TUN flags.

    Raises:
        TapError: the name is empty, not ASCII, or longer than 15 bytes.
    """
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise TapError(f"interface name {name!r} must be ASCII") from None
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or raw.isspace():
        raise TapError(f"interface name {name!r} must be 1..{IFNAMSIZ - 1} characters")
    return struct.pack("16sH22x", raw, flags)


def open_tap(name: str = DEFAULT_TAP_NAME, tun_path: str = TUN_PATH) -> int:
    """Create (or attach to) TAP interface `name` and return its file descriptor.

    The descriptor is blocking and close-on-exec; the caller owns it.

    Raises:
        TapError: no TUN device, not permitted, or the name is busy.
    """
    ifreq = build_ifreq(name)
    try:
        fd = os.open(tun_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _explain(exc, name, tun_path) from exc
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError as exc:
        os.close(fd)
        raise _explain(exc, name, tun_path) from exc
    return fd


def _explain(exc: OSError, name: str, tun_path: str) -> TapError:
    """Turn an OSError from opening the TUN device into a one-line instruction."""
    if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return TapError(
            f"{tun_path} is missing: load the tun module (modprobe tun) or build the "
            "enclave kernel with CONFIG_TUN"
        )
    if exc.errno in (errno.EPERM, errno.EACCES):
        return TapError(f"creating {name} needs root (CAP_NET_ADMIN): run as root")
    if exc.errno == errno.EBUSY:
        return TapError(f"{name} is busy: is another nitro-netd-enclave running?")
    if exc.errno == errno.EINVAL:
        return TapError(f"{name} exists and is not a TAP device: pick another --tap name")
    return TapError(f"cannot create {name} via {tun_path}: {exc.strerror or exc}")

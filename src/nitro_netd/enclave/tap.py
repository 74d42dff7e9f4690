"""Create the enclave's TAP device from ``/dev/net/tun`` and set its offloads.

The TAP is opened without a packet-info header and with ``IFF_VNET_HDR``: every frame read
from it starts with a 10-byte ``struct virtio_net_hdr`` and every frame written must start
with one (`VNET_HDR_SIZE`, the kernel's default size). That header lets the agent hand the
enclave's kernel TCP segments whose checksum is only partial (``NEEDS_CSUM``), and, with
``TUNSETOFFLOAD`` = `TUN_F_CSUM`, lets the kernel hand the agent such frames. With
`TUN_F_TSO4` as well (only when the parent agreed to segmentation offload) the kernel hands
over TCP/IPv4 super-segments up to 64 KiB whatever the MTU, and takes them from the agent.

The returned file descriptor *is* the device: the kernel removes a non-persistent TAP when
its last descriptor closes, so the agent opens it once and keeps it for its whole life,
across link sessions. Its MTU can change between sessions (`set_mtu`): the agent gives it
the MTU the parent states for each link.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import Final

TUN_PATH: Final = "/dev/net/tun"
TUNSETIFF: Final = 0x400454CA
"""<linux/if_tun.h>: _IOW('T', 202, int)."""
TUNSETOFFLOAD: Final = 0x400454D0
"""<linux/if_tun.h>: _IOW('T', 208, unsigned int); the argument is the flags themselves."""
TUNGETIFF: Final = 0x800454D2
"""<linux/if_tun.h>: _IOR('T', 210, unsigned int); fills a ``struct ifreq``."""
SIOCSIFMTU: Final = 0x8922
"""<linux/sockios.h>: set an interface's MTU (a ``struct ifreq`` carrying ``ifr_mtu``)."""
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
TAP_FLAGS: Final = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
"""What `open_tap` asks for."""
TUN_F_CSUM: Final = 0x01
"""TUNSETOFFLOAD: the agent accepts frames with partial checksums."""
TUN_F_TSO4: Final = 0x02
"""TUNSETOFFLOAD: the agent accepts TCP/IPv4 GSO super-segments (needs `TUN_F_CSUM`)."""
VNET_HDR_SIZE: Final = 10
"""``struct virtio_net_hdr`` without ``num_buffers``: the default TUNSETVNETHDRSZ."""
IFNAMSIZ: Final = 16
DEFAULT_TAP_NAME: Final = "tap0"


class TapError(Exception):
    """The TAP device cannot be created; the message says what to do."""


def build_ifreq(name: str, flags: int = TAP_FLAGS) -> bytes:
    """Return a ``struct ifreq`` naming the interface and carrying TUN flags.

    Raises:
        TapError: the name is not one the kernel takes (`dev_valid_name`): empty, longer
            than 15 bytes, "." or "..", or with a "/", ":" or white space; or not ASCII.
    """
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise TapError(f"interface name {name!r} must be ASCII") from None
    if not raw or len(raw) >= IFNAMSIZ:
        raise TapError(f"interface name {name!r} must be 1..{IFNAMSIZ - 1} characters")
    if raw in (b".", b"..") or any(c in b"/: \t\n\v\f\r" for c in raw):
        raise TapError(
            f'interface name {name!r} must not be "." or "..", nor hold "/", ":" or spaces'
        )
    return struct.pack("16sH22x", raw, flags)


def open_tap(name: str = DEFAULT_TAP_NAME, tun_path: str = TUN_PATH) -> int:
    """Create (or attach to) TAP interface `name` and return its file descriptor.

    The descriptor is blocking and close-on-exec, and carries virtio-net headers
    (`TAP_FLAGS`); the caller owns it.

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


def tap_name(fd: int) -> str:
    """The name of the TUN/TAP device behind `fd`.

    Raises:
        OSError: `fd` is not (or no longer: the device was deleted, EBADFD) a TUN/TAP.
    """
    ifreq = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    return ifreq[:IFNAMSIZ].rstrip(b"\0").decode()


def has_vnet_hdr(fd: int) -> bool:
    """Return True if `fd` is a TUN/TAP descriptor whose frames carry virtio-net headers.

    Anything else (a socket standing in for the TAP in tests) answers False.
    """
    try:
        ifreq = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError:
        return False
    (flags,) = struct.unpack_from("H", ifreq, IFNAMSIZ)
    return bool(flags & IFF_VNET_HDR)


def set_offload(fd: int, flags: int) -> None:
    """Set the TAP's offloads (``TUNSETOFFLOAD``): `TUN_F_CSUM` or 0.

    Raises:
        OSError: not a TAP, or the kernel refuses the flags.
    """
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def build_mtu_ifreq(name: str, mtu: int) -> bytes:
    """Return a ``struct ifreq`` naming the interface and carrying ``ifr_mtu``.

    Raises:
        TapError: a bad interface name (see `build_ifreq`).
    """
    return build_ifreq(name, 0)[:IFNAMSIZ] + struct.pack("i20x", mtu)


def set_mtu(fd: int, mtu: int) -> None:
    """Set the MTU of the TAP behind `fd` (``SIOCSIFMTU``); its addresses and routes stay.

    Raises:
        OSError: `fd` is not a TAP, or the kernel refuses the MTU.
    """
    ifreq = build_mtu_ifreq(tap_name(fd), mtu)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCSIFMTU, ifreq)


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

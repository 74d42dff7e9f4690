"""The systemd notify protocol (``Type=notify``), without libsystemd.

systemd passes a unix datagram socket in ``NOTIFY_SOCKET`` (a path, or an abstract name
written with a leading ``@``); the service sends newline-separated ``KEY=VALUE`` lines to
it: ``READY=1`` once it serves, ``STOPPING=1`` when it begins to stop, ``STATUS=...`` for
`systemctl status`. With no ``NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


def notify_address(value: str) -> str | bytes | None:
    """The socket address named by a ``NOTIFY_SOCKET`` value, or None if unusable.

    ``@name`` is the abstract name ``\\0name``; otherwise it must be an absolute path.
    """
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def build_message(**fields: str | int) -> bytes:
    """``build_message(READY=1, STATUS="up")`` -> ``b"READY=1\\nSTATUS=up"``."""
    return "\n".join(f"{key}={value}" for key, value in fields.items()).encode()


def sd_notify(message: bytes, environ: Mapping[str, str] | None = None) -> bool:
    """Send one notification if systemd asked for them; True if it was sent.

    Never raises: a failure is logged (the daemon works without systemd).
    """
    env = os.environ if environ is None else environ
    value = env.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = notify_address(value)
    if address is None:
        logger.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract: ignored", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        logger.warning("cannot notify systemd at %s: %s", value, exc)
        return False
    return True


def notify_ready(status: str) -> bool:
    """``READY=1`` with a status line and our pid."""
    return sd_notify(build_message(READY=1, STATUS=status, MAINPID=os.getpid()))


def notify_stopping() -> bool:
    """``STOPPING=1``."""
    return sd_notify(build_message(STOPPING=1, STATUS="stopping"))

"""Point the enclave's resolver at the gateway's DNS server.

Nitro enclave images often ship ``/etc/resolv.conf`` as a symlink to
``/run/resolvconf/resolv.conf`` (or, with systemd, into ``/run/systemd/resolve/``) whose
directory does not exist: the writer follows the link, creates the missing directory and
writes the target. A path that is not a symlink must be in a directory that exists
(`check_resolv_conf`): nothing reads a resolv.conf in a directory nobody made, so a mistyped
``--resolv-conf`` is an error at start-up. It writes a temporary file and renames it over
the target; where renaming is impossible (a bind-mounted file, as ``ip netns exec``
makes of ``/etc/netns/NAME/resolv.conf``) it rewrites the file in place.

The file's previous content is read first (`read_resolv_conf`) and put back when the agent
exits (`restore_resolv_conf`), unless someone changed the file meanwhile: after the agent
the gateway's address no longer exists, and the user's resolver must not be lost.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Final

DEFAULT_RESOLV_CONF: Final = "/etc/resolv.conf"
DEFAULT_NAMESERVER: Final = "192.168.127.1"


class ResolvConfError(Exception):
    """resolv.conf cannot be written; the message says what to do."""


def render_resolv_conf(nameserver: str = DEFAULT_NAMESERVER) -> str:
    """Return the resolv.conf text the agent writes."""
    return f"# written by nitro-netd-enclave\nnameserver {nameserver}\n"


def check_resolv_conf(path: str) -> str:
    """Return the file writing resolv.conf at `path` writes: the target of a symlink (whose
    directory is made when written, if missing), else `path` itself.

    This runs before anything is set up, so that a bad path fails with nothing done; a
    write can still fail later (a full disk), and is then an error too.

    Raises:
        ResolvConfError: `path` is empty or a directory, or it is not a symlink and its
            directory does not exist, or neither it nor its directory can be written.
    """
    advice = "pass --resolv-conf PATH or --no-resolv-conf"
    if not path:
        raise ResolvConfError(f"--resolv-conf needs a file's path; {advice}")
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise ResolvConfError(f"cannot write {path}: it is a directory; {advice}")
    if os.path.islink(path):
        return target
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise ResolvConfError(
            f"cannot write {path}: the directory {directory} does not exist, so no resolver"
            f" would read it; {advice}"
        )
    if not os.access(directory, os.W_OK) and not os.access(target, os.W_OK):
        raise ResolvConfError(f"cannot write {path}: permission denied (or read-only); {advice}")
    return target


def write_resolv_conf(path: str = DEFAULT_RESOLV_CONF, nameserver: str = DEFAULT_NAMESERVER) -> str:
    """Write resolv.conf at `path` (following symlinks) and return the file written.

    The directory is made only for a symlink's target (see `check_resolv_conf`).

    Raises:
        ResolvConfError: the file or its directory cannot be written, or `path` is in a
            directory that does not exist.
    """
    target = check_resolv_conf(path)
    data = render_resolv_conf(nameserver).encode("ascii")
    try:
        if os.path.islink(path):  # its target's directory may not exist yet
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        _write_atomically(target, data)
    except OSError as exc:
        raise ResolvConfError(
            f"cannot write {target}: {exc.strerror or exc}; "
            "pass --resolv-conf PATH or --no-resolv-conf"
        ) from exc
    return target


def read_resolv_conf(path: str = DEFAULT_RESOLV_CONF) -> bytes | None:
    """The content of resolv.conf at `path` (following symlinks); None if there is none
    (or it cannot be read: then nothing will be put back)."""
    try:
        with open(os.path.realpath(path), "rb") as handle:
            return handle.read()
    except OSError:
        return None


def restore_resolv_conf(
    path: str, original: bytes | None, nameserver: str = DEFAULT_NAMESERVER
) -> str:
    """Put back the resolv.conf the agent replaced, if the file still holds what the agent
    wrote (someone else's change is left alone); remove it if there was none before.
    Return what was done, for the log.

    Raises:
        ResolvConfError: the file cannot be written or removed.
    """
    target = os.path.realpath(path)
    if read_resolv_conf(target) != render_resolv_conf(nameserver).encode("ascii"):
        return f"left {target} as it is: it does not hold what the agent wrote"
    try:
        if original is None:
            os.unlink(target)
            return f"removed {target} (there was none before)"
        _write_atomically(target, original)
    except OSError as exc:
        raise ResolvConfError(f"cannot restore {target}: {exc.strerror or exc}") from exc
    return f"restored {target}"


_NO_RENAME: Final = frozenset({errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.EROFS})
"""Errors after which a rename cannot work but an in-place write may."""


def _write_atomically(target: str, data: bytes) -> None:
    """Rename a complete temporary file over `target`; rewrite in place if rename fails."""
    try:
        temporary = _write_temporary(os.path.dirname(target), data)
    except OSError as exc:
        if exc.errno not in _NO_RENAME:
            raise
        _write_in_place(target, data)
        return
    try:
        os.replace(temporary, target)
    except OSError as exc:
        os.unlink(temporary)
        if exc.errno not in _NO_RENAME:
            raise
        _write_in_place(target, data)


def _write_temporary(directory: str, data: bytes) -> str:
    fd, temporary = tempfile.mkstemp(prefix=".resolv.conf.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
    except OSError:
        os.unlink(temporary)
        raise
    return temporary


def _write_in_place(target: str, data: bytes) -> None:
    with open(target, "wb") as handle:
        handle.write(data)

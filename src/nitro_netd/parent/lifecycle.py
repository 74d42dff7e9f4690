"""The daemon's process lifecycle: state dir, single-instance pidfile lock, daemonizing.

Theory of operation
-------------------
A named daemon keeps its state in ``ROOT/NAME/`` (ROOT is ``/run/nitro-netd`` unless
``--state-dir`` says otherwise): ``parent.pid``, ``control.sock`` and, when daemonized
without ``--log-file``, ``parent.log``.

*Single instance.* The pidfile is opened and ``flock``-ed (exclusive, non-blocking) before
anything is bound; the lock lives as long as the open file, so a daemon that dies for any
reason releases it, and a stale pidfile never blocks a restart. A second daemon for the
same name fails at once naming the pid in the file. On exit the file is unlinked while
still locked. A racing starter that opened the old inode notices (its inode differs from
the path's) and tries again.

*Daemonizing* is the classic double fork, plus a readiness pipe: the launching process
keeps the read end and blocks until the daemon writes ``pid N``, then ``ready`` (exit 0)
or ``error MESSAGE`` (the message is printed, exit 1). End of file without either means
the daemon died during start-up: the launcher says so and points at the log.

*Reopening the log* (SIGHUP, for logrotate): the log file is opened again by name and the
new descriptor put in place of the old ones with ``dup2`` (stdout and stderr of a
daemonized daemon, the log handler's stream of a foreground ``--log-file``), by the same
two helpers daemonizing uses (`open_log`, `redirect`). The path must be absolute: a
daemon's working directory is ``/``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import select
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

DEFAULT_STATE_ROOT: Final = Path("/run/nitro-netd")
DEFAULT_NAME: Final = "default"
READY_TIMEOUT: Final = 60.0
"""How long the launcher waits for a daemonized child to report."""
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LOG_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
_LOG_MODE: Final = 0o644


class LifecycleError(Exception):
    """A start-up problem the operator must fix; the message says what to do."""


class AlreadyRunning(LifecycleError):
    """Another daemon holds the pidfile lock for this name."""


def check_name(name: str) -> str:
    """Return `name` if it can name a state dir.

    Raises:
        ValueError: it contains characters other than letters, digits, '.', '_', '-'.
    """
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"--enclave-name {name!r}: use 1-64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True, slots=True)
class StatePaths:
    """Where one named daemon keeps its state."""

    root: Path
    """The runtime dir holding one dir per name (``--state-dir``)."""
    name: str
    """The enclave name (or "default")."""

    @property
    def directory(self) -> Path:
        """``ROOT/NAME``."""
        return self.root / self.name

    @property
    def pidfile(self) -> Path:
        """Holds the daemon's pid; locked while it runs."""
        return self.directory / "parent.pid"

    @property
    def control(self) -> Path:
        """The control socket `nitro-netd status` talks to."""
        return self.directory / "control.sock"

    @property
    def log(self) -> Path:
        """The default log file of a daemonized daemon."""
        return self.directory / "parent.log"


def running_as_root() -> bool:
    """Whether advice to "run as root" would be pointless (we already are)."""
    return os.geteuid() == 0


def state_dir_advice() -> str:
    """What to do about state that may not be written (no "run as root" to root)."""
    root = "" if running_as_root() else "run as root, or "
    return f" ({root}pass --state-dir DIR to a directory you may write)"


def create_state_dir(directory: Path) -> None:
    """Create a state directory (and its parents) if missing.

    Raises:
        LifecycleError: it cannot be created (the message names it as the state directory).
    """
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        hint = state_dir_advice() if exc.errno in (errno.EACCES, errno.EPERM) else ""
        raise LifecycleError(
            f"cannot create state directory {directory}: {exc.strerror or exc}{hint}"
        ) from exc


class PidLock:
    """An exclusive flock on the pidfile, holding this process's pid."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, name: str) -> PidLock:
        """Lock `path` (creating it) and write our pid into it.

        Raises:
            AlreadyRunning: another live process holds the lock (message names its pid).
            OSError: the file cannot be created.
        """
        create_state_dir(path.parent)
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AlreadyRunning(_running_message(path, name)) from None
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return cls(path, fd)
            os.close(fd)  # the holder unlinked it between our open and our lock
        raise LifecycleError(f"cannot lock {path}: it keeps being replaced")

    @staticmethod
    def check(path: Path, name: str) -> None:
        """Fail early if a daemon holds the lock (the launcher's check before forking).

        Raises:
            AlreadyRunning: the lock is held (message names the pid).
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(_running_message(path, name)) from None
        finally:
            os.close(fd)

    def release(self) -> None:
        """Remove the pidfile and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()  # only if empty: a log file keeps it


def read_pid(path: Path) -> int | None:
    """The pid recorded in a pidfile, or None if absent or unreadable."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (also when it is another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running_message(path: Path, name: str) -> str:
    pid = read_pid(path)
    who = f"pid {pid}" if pid is not None else "another process"
    return (
        f"a nitro-netd-parent for {name!r} is already running ({who}, lock on {path}); "
        "stop it first or pick another --enclave-name"
    )


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


# -- daemonizing -----------------------------------------------------------------------


class Readiness:
    """The daemon's end of the readiness pipe: report once, `ready()` or `failed()`."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def ready(self) -> None:
        """Tell the launcher that everything is bound: it exits 0."""
        self._send("ready")

    def failed(self, message: str) -> None:
        """Tell the launcher why start-up failed: it prints `message` and exits 1."""
        self._send("error " + message.replace("\n", " "))

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, (line + "\n").encode())
        os.close(self._fd)
        self._fd = None


def daemonize(log_path: Path) -> Readiness | tuple[int, str]:
    """Fork into the background, the output going to `log_path`.

    Returns:
        In the daemon: its `Readiness`, to report on. In the launching process (once the
        daemon reported or died): the exit status and, on failure, the one-line error.
    Raises:
        OSError: the log file cannot be opened, its directory missing included (raised
            before forking; the caller makes a state dir it logs into).
    """
    log_fd = open_log(log_path)
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        _become_daemon(log_fd, write_fd)
        return Readiness(write_fd)
    os.close(write_fd)
    os.close(log_fd)
    os.waitpid(child, 0)  # the first child exits as soon as it has forked again
    return wait_for_daemon(read_fd, log_path)


DAEMON_OUTPUT: Final = (1, 2)
"""The descriptors a daemonized daemon logs to (stdout, stderr: both the log file)."""


def open_log(path: Path) -> int:
    """Open `path` for appending (created 0644 if missing); return the descriptor.

    Raises:
        OSError: it cannot be opened.
    """
    return os.open(path, _LOG_FLAGS, _LOG_MODE)


def redirect(fd: int, targets: Sequence[int]) -> None:
    """Put `fd` in place of each of `targets` (``dup2``), then close `fd`.

    Python's buffered ``sys.stdout``/``sys.stderr`` are flushed first, so what they hold
    goes to the file it was written for.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    try:
        for target in targets:  # (a log handler's own descriptor stays close-on-exec)
            os.dup2(fd, target, inheritable=target <= 2)
    finally:
        if fd not in targets:
            os.close(fd)


def reopen_log(path: Path, targets: Sequence[int]) -> None:
    """SIGHUP: open the log file `path` again and redirect `targets` to it (logrotate
    renamed the old one).

    Never raises: a log that cannot be reopened is logged (to the old file) and kept.
    """
    try:
        redirect(open_log(path), targets)
    except OSError as exc:
        logger.warning(
            "SIGHUP: cannot reopen the log file %s: %s; still logging to the old one",
            path,
            exc.strerror or exc,
        )
        return
    logger.info("SIGHUP: reopened the log file %s", path)


def remove_new_log(log_path: Path, existed: bool) -> None:
    """After a failed start (already reported): drop a log file this launch created."""
    if existed:
        return
    with contextlib.suppress(OSError):
        log_path.unlink()
        log_path.parent.rmdir()


def _become_daemon(log_fd: int, write_fd: int) -> None:
    """Runs in the first child: new session, fork again, detach stdio."""
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    os.chdir("/")
    null_fd = os.open(os.devnull, os.O_RDONLY)
    redirect(null_fd, (0,))
    redirect(log_fd, DAEMON_OUTPUT)
    os.write(write_fd, f"pid {os.getpid()}\n".encode())


def wait_for_daemon(
    read_fd: int, log_path: Path, timeout: float = READY_TIMEOUT
) -> tuple[int, str]:
    """The launcher's half: read the daemon's report from the pipe.

    Returns:
        (0, "") once it is ready, else (1, one-line error).
    """
    lines = _read_report(read_fd, timeout)
    os.close(read_fd)
    pid = next((int(line[4:]) for line in lines if line.startswith("pid ")), None)
    for line in lines:
        if line == "ready":
            return 0, ""
        if line.startswith("error "):
            return 1, line[6:]
    if lines and lines[-1] == "timeout" and pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        return (
            1,
            f"the daemon (pid {pid}) was not ready within {timeout:g} s; stopped it; see {log_path}",
        )
    return 1, f"the daemon exited during start-up; see {log_path}"


def _read_report(read_fd: int, timeout: float) -> list[str]:
    """Read until the daemon closes its end (it does right after reporting) or `timeout`."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([read_fd], [], [], left)[0]:
            return [*data.decode(errors="replace").splitlines(), "timeout"]
        chunk = os.read(read_fd, 4096)
        if not chunk:
            return data.decode(errors="replace").splitlines()
        data += chunk

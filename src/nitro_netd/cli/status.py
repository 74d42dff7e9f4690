"""`nitro-netd status [NAME]`: ask a running `nitro-netd-parent` what it is doing.

It connects to ``STATE_DIR/NAME/control.sock``, sends ``status`` and prints the reply as a
table (or, with ``--json``, as the daemon's JSON object, for scripts). Without NAME it
picks the only daemon running under STATE_DIR (state left by one that died does not
count). Also runnable as ``python -m nitro_netd.cli.status``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from nitro_netd.cli.common import fail
from nitro_netd.parent.lifecycle import (
    DEFAULT_STATE_ROOT,
    StatePaths,
    pid_alive,
    read_pid,
    running_as_root,
)

PROG: Final = "nitro-netd status"
QUERY_TIMEOUT: Final = 5.0


class StatusError(Exception):
    """No answer from a daemon; the message says why and what to do."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `status` subcommand to an umbrella command's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status", help="show what a running nitro-netd-parent is doing"
    )
    configure_parser(parser)
    return parser


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The status command's arguments (shared by the umbrella and `main`)."""
    parser.add_argument(
        "name", nargs="?", help="the daemon's --enclave-name (default: the only one running)"
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON status")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_ROOT,
        metavar="DIR",
        help="the daemon's --state-dir (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the status of the daemon `args.name`; return the exit status."""
    try:
        paths = StatePaths(args.state_dir, resolve_name(args.state_dir, args.name))
        status = query_status(paths)
    except StatusError as exc:
        return fail(PROG, str(exc))
    if args.json:
        text = json.dumps(status, indent=2, sort_keys=True)
    else:
        text = render_status(status, now=time.time())
    return print_output(text)


def print_output(text: str) -> int:
    """Print `text` to stdout; return 0, also when the reader went away (``| head -1``).

    A closed pipe is the reader's choice, not an error: no traceback, and stdout is
    pointed at /dev/null so that the interpreter's last flush does not complain either.
    """
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def daemon_running(paths: StatePaths) -> bool:
    """Whether a live daemon owns `paths`: the pid in its pidfile (if any) exists and
    its control socket takes a connection. Permission denied or no quick answer count
    as live: the status query then says what is wrong."""
    pid = read_pid(paths.pidfile)
    if pid is not None and not pid_alive(pid):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(QUERY_TIMEOUT)
        try:
            sock.connect(str(paths.control))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True
    return True


def resolve_name(
    root: Path, name: str | None, running: Callable[[StatePaths], bool] = daemon_running
) -> str:
    """`name`, or the one live daemon under `root` (as `running` judges). State left by
    daemons that died does not count.

    Raises:
        StatusError: no name given and none or several live daemons found.
    """
    if name is not None:
        return name
    found = _state_names(root)
    live = [n for n in found if running(StatePaths(root, n))]
    if len(live) == 1:
        return live[0]
    if live:
        raise StatusError(f"several daemons run under {root} ({', '.join(live)}): name one")
    if found:
        who = "a daemon" if len(found) == 1 else "daemons"
        raise StatusError(
            f"no nitro-netd-parent is running under {root} ({', '.join(found)}: "
            f"left by {who} that died)"
        )
    raise StatusError(f"no nitro-netd-parent is running under {root} (no control socket)")


def _state_names(root: Path) -> list[str]:
    """The names under `root` with a control socket file, live or not."""
    try:
        return sorted(d.name for d in root.iterdir() if (d / "control.sock").exists())
    except OSError:
        return []


def query_status(paths: StatePaths, timeout: float = QUERY_TIMEOUT) -> dict[str, Any]:
    """Ask the daemon's control socket for its status.

    Raises:
        StatusError: no daemon, a dead daemon's socket, no permission, or no answer.
    """
    reply = _exchange(paths, b"status\n", timeout)
    try:
        answer = json.loads(reply)
    except json.JSONDecodeError:
        raise StatusError(f"the daemon for {paths.name!r} sent an unreadable reply") from None
    if not answer.get("ok"):
        raise StatusError(f"the daemon for {paths.name!r} said: {answer.get('error')}")
    status: dict[str, Any] = answer["status"]
    return status


def _exchange(paths: StatePaths, request: bytes, timeout: float) -> bytes:
    name, path = paths.name, paths.control
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(request)
            return _read_all(sock)
        except FileNotFoundError:
            raise StatusError(
                f"no nitro-netd-parent is running for {name!r}: no {path} "
                f"(start one with `nitro-netd-parent --enclave-name {name}`)"
            ) from None
        except ConnectionRefusedError:
            raise StatusError(
                f"no nitro-netd-parent is running for {name!r}: {path} is left from one that died"
            ) from None
        except PermissionError:
            hint = "" if running_as_root() else " (try as root)"
            raise StatusError(f"cannot open {path}: permission denied{hint}") from None
        except TimeoutError:
            raise StatusError(
                f"the daemon for {name!r} did not answer within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise StatusError(f"cannot talk to the daemon at {path}: {exc.strerror}") from None


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- rendering -------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h02m05s``; ``65`` -> ``1m05s``; ``4.2`` -> ``4s``."""
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _link_line(link: dict[str, Any], now: float) -> str:
    state = "up" if link["up"] else "down"
    if link["since"] is not None:
        state += f" for {format_duration(now - link['since'])}"
    if link["peer"]:
        state += f", {'peer' if link['up'] else 'last peer'} {link['peer']}"
    return f"{state}; {link['accepted']} accepted, {link['refused']} refused"


def _enclave_line(enclave: dict[str, Any]) -> str:
    if not enclave["name"]:
        return "(no --enclave-name)"
    if not enclave["following"]:
        return f"{enclave['name']} (not followed: no nitro-cli; links not pinned)"
    where = (
        f"CID {enclave['cid']}, {enclave['state']}" if enclave["cid"] is not None else "not running"
    )
    return f"{enclave['name']}: {where} (following with {enclave['nitro_cli']})"


def _nitro_cli_line(enclave: dict[str, Any]) -> str | None:
    """The last nitro-cli error, or None while it works (and from older daemons)."""
    error = enclave.get("error")
    return f"failing: {error}" if error else None


def _busy_poll_line(busy: dict[str, Any]) -> str:
    if not busy["window_us"]:
        return "off"
    return (
        f"{busy['window_us']} µs windows, {busy['seconds']:.3f} s awake in "
        f"{busy['windows']} windows"
    )


def _splice_line(splice: dict[str, Any]) -> str:
    if splice["enabled"]:
        state = f"on (bulk-flow limit {splice['limit']})"
    else:
        state = "off"
    stopped = f", {splice['stopped']} went back to copying" if splice.get("stopped") else ""
    return f"{state}; {splice['flows']} flows spliced{stopped}, {splice['bytes']} bytes so far"


def render_status(status: dict[str, Any], *, now: float) -> str:
    """The human-readable table for one status snapshot."""
    counters = status["counters"]
    exposed = ", ".join(
        f"{e['protocol']} {e['parent_port']}->{e['enclave_port']}" for e in status["exposed"]
    )
    drops = ", ".join(f"{reason} {n}" for reason, n in counters["drops"].items())
    rows = [
        ("daemon", f"pid {status['pid']}, up {format_duration(status['uptime'])}, listening on {status['listen']}"),
        ("link", _link_line(status["link"], now)),
        ("enclave", _enclave_line(status["enclave"])),
        ("exposed", exposed or "none"),
        ("flows", "  ".join(f"{proto} {n}" for proto, n in status["flows"].items())),
        ("from enclave", f"{counters['frames_in']} frames, {counters['bytes_in']} bytes"),
        ("to enclave", f"{counters['frames_out']} frames, {counters['bytes_out']} bytes"),
        ("drops", drops or "none"),
    ]  # fmt: skip
    if recovery := counters.get("tcp"):  # absent from older daemons' status
        rows.append(("tcp recovery", ", ".join(f"{event} {n}" for event, n in recovery.items())))
    if nitro_cli := _nitro_cli_line(status["enclave"]):
        rows.insert(3, ("nitro-cli", nitro_cli))
    if status.get("pcap"):
        rows.append(("pcap", status["pcap"]))
    if busy := status.get("busy_poll"):  # absent from older daemons' status
        rows.append(("busy poll", _busy_poll_line(busy)))
    if splice := status.get("splice"):  # absent from older daemons' status
        rows.append(("splice", _splice_line(splice)))
    width = max(len(label) for label, _ in rows)
    title = _title(status)
    return "\n".join([title, *(f"  {label:<{width}}  {value}" for label, value in rows)])


def _title(status: dict[str, Any]) -> str:
    """``nitro-netd-parent NAME``; for a daemon without a name, where its state is."""
    if status["name"]:
        return f"nitro-netd-parent {status['name']}"
    state = status.get("state_dir")  # absent from older daemons' status
    return f"nitro-netd-parent (no --enclave-name{f'; state in {state}' if state else ''})"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m nitro_netd.cli.status [NAME] [--json] [--state-dir DIR]`."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

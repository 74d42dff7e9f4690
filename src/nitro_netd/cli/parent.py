"""`nitro-netd-parent`: the daemon on the parent instance."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from nitro_netd.cli.common import LOG_LEVELS, fail, mtu_argument, setup_logging
from nitro_netd.netstack.config import DEFAULT_MTU, MAX_TIMEOUT, StackConfig
from nitro_netd.parent.busy_poll import DEFAULT_WINDOW as DEFAULT_BUSY_POLL
from nitro_netd.parent.busy_poll import MAX_WINDOW as MAX_BUSY_POLL
from nitro_netd.parent.daemon import DaemonConfig, run
from nitro_netd.parent.enclave_watch import DEFAULT_POLL
from nitro_netd.parent.expose import parse_exposes
from nitro_netd.parent.host_tcp import SPLICE_FLOWS
from nitro_netd.parent.lifecycle import (
    DAEMON_OUTPUT,
    DEFAULT_NAME,
    DEFAULT_STATE_ROOT,
    LifecycleError,
    PidLock,
    Readiness,
    StatePaths,
    check_name,
    create_state_dir,
    daemonize,
    open_log,
    remove_new_log,
    reopen_log,
    state_dir_advice,
)
from nitro_netd.parent.metrics import parse_metrics_listen
from nitro_netd.parent.pcap import DEFAULT_MAX_BYTES as DEFAULT_PCAP_MAX_BYTES
from nitro_netd.transport import EndpointError, parse_endpoint

PROG: Final = "nitro-netd-parent"
MAX_SPLICE_FLOWS: Final = 1024

EPILOG: Final = """\
examples:
  nitro-netd-parent                                  listen on vsock port 1024 (the default)
  nitro-netd-parent --listen unix:///run/nnd.sock    listen on a unix socket (the simulator)
  nitro-netd-parent -e 8080:80 -e 2222:22            parent ports 8080, 2222 -> enclave 80, 22
  nitro-netd-parent --enclave-name app --daemonize -e 443
                                                     background daemon for enclave "app"; returns
                                                     once port 443 and the link listener are ready
  nitro-netd status app                              what it is doing (link, flows, counters)

--expose PARENT[:ENCLAVE]: the parent listens on PARENT on all its addresses and opens each
accepted connection to 192.168.127.2:ENCLAVE inside the enclave, which sees the client's
real address (a client on the parent's own loopback appears as 192.168.127.254).
PARENT alone means the same port on both sides; ranges map in order (8000-8009:9000-9009).

The agent inside the enclave (nitro-netd-enclave) or a stock gvforwarder connects to
--listen; the framing (gvproxy POST /connect, or QEMU 4-byte lengths) is detected.

State: with --enclave-name NAME (or --daemonize or --state-dir) the daemon keeps
STATE_DIR/NAME/parent.pid (locked: one daemon per name) and control.sock (for
`nitro-netd status`), and removes them on exit. Where nitro-cli is found, links are
pinned to the CID of the running enclave NAME.
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (kept separate so it can be tested)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Userspace network stack giving a Nitro Enclave ordinary networking over vsock.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--listen",
        default="vsock://:1024",
        metavar="URL",
        help="where the enclave's agent connects: vsock://:PORT or unix:///path (default: %(default)s)",
    )
    parser.add_argument(
        "--mtu",
        type=mtu_argument,
        default=DEFAULT_MTU,
        help="link MTU, stated to the agent, which gives its TAP the same (default: %(default)s)",
    )
    parser.add_argument(
        "-e",
        "--expose",
        action="append",
        default=[],
        metavar="PARENT[:ENCLAVE]",
        help="carry parent port PARENT (on all its addresses) to enclave port ENCLAVE; repeatable; "
        "ranges (8000-8009:9000-9009) and udp:PORT[:PORT] accepted",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long an outbound TCP connect may take before the enclave is told the host is unreachable (default: %(default)s)",
    )
    parser.add_argument(
        "--udp-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="idle time after which a UDP flow is forgotten (default: %(default)s)",
    )
    parser.add_argument(
        "--busy-poll-us",
        type=_busy_poll_us,
        default=round(DEFAULT_BUSY_POLL * 1e6),
        metavar="US",
        help="keep polling this many microseconds after each burst of work instead of "
        "sleeping at once: cuts round-trip latency on VMs, costs at most that much CPU per "
        f"burst; 0: off, at most {round(MAX_BUSY_POLL * 1e6)} (default: %(default)s)",
    )
    parser.add_argument(
        "--splice-flows",
        type=_splice_flows,
        default=SPLICE_FLOWS,
        metavar="N",
        help="at most N bulk flows to the enclave at a time move their bytes into the link by "
        "splice(2) instead of copying them (less daemon CPU per byte; needs the agent's "
        "checksum offload and large segments); 0: never (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="default: %(default)s"
    )
    _add_lifecycle_arguments(parser)
    return parser


def _add_lifecycle_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("daemon lifecycle")
    group.add_argument(
        "--enclave-name",
        metavar="NAME",
        help="the enclave this daemon serves: names its state dir and, with nitro-cli, pins links to its CID",
    )
    group.add_argument(
        "--state-dir",
        type=_state_dir,
        metavar="DIR",
        help=f"runtime dir holding NAME/parent.pid and NAME/control.sock (default: {DEFAULT_STATE_ROOT})",
    )
    group.add_argument(
        "--daemonize",
        action="store_true",
        help="run in the background; return 0 once ready, non-zero with the error otherwise",
    )
    group.add_argument(
        "--log-file",
        type=_absolute_path,
        metavar="FILE",
        help="append the log here (default: stderr; with --daemonize STATE_DIR/NAME/parent.log); "
        "SIGHUP reopens it (logrotate)",
    )
    group.add_argument(
        "--nitro-cli",
        metavar="PATH",
        help="the nitro-cli used to follow --enclave-name (default: nitro-cli on PATH, if any)",
    )
    group.add_argument(
        "--enclave-poll",
        type=float,
        default=DEFAULT_POLL,
        metavar="SECONDS",
        help="how often nitro-cli is asked about the enclave (default: %(default)s)",
    )
    group.add_argument(
        "--exit-with-enclave",
        action="store_true",
        help="exit 0 once the followed enclave is gone (needs --enclave-name and nitro-cli)",
    )
    group.add_argument(
        "--pcap", type=Path, metavar="FILE", help="write every link frame to FILE (pcap)"
    )
    group.add_argument(
        "--pcap-max-mb",
        type=_pcap_max_mb,
        default=DEFAULT_PCAP_MAX_BYTES >> 20,
        metavar="MB",
        help="stop the capture before FILE grows past MB mebibytes; 0: no limit "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )


def _absolute_path(text: str) -> Path:
    """A path made absolute now: ``--daemonize`` changes directory to ``/`` later, and
    SIGHUP reopens the log file by this name."""
    return Path(text).absolute()


def _state_dir(text: str) -> Path:
    """``--state-dir``: a directory path, not empty (that would mean the current one)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (the default is /run/nitro-netd)")
    return _absolute_path(text)


def _whole_number(text: str) -> int:
    """An option's whole-number value (argparse reports the error with the option)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _pcap_max_mb(text: str) -> int:
    """``--pcap-max-mb``: a whole number of MiB, 0 for no limit."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (0 means no limit)")
    return value


def _splice_flows(text: str) -> int:
    """``--splice-flows``: a whole number, 0 (never) up to `MAX_SPLICE_FLOWS`."""
    value = _whole_number(text)
    if not 0 <= value <= MAX_SPLICE_FLOWS:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..{MAX_SPLICE_FLOWS}")
    return value


def _busy_poll_us(text: str) -> int:
    """``--busy-poll-us``: whole microseconds, 0 (off) up to `MAX_BUSY_POLL`."""
    value = _whole_number(text)
    if not 0 <= value <= MAX_BUSY_POLL * 1e6:
        raise argparse.ArgumentTypeError(
            f"{value} is outside 0..{round(MAX_BUSY_POLL * 1e6)} (0 turns busy polling off)"
        )
    return value


def build_config(args: argparse.Namespace) -> DaemonConfig:
    """Turn parsed arguments into a frozen config.

    Raises:
        ValueError: an argument is invalid (message says which and why).
    """
    for name in ("connect_timeout", "udp_timeout", "enclave_poll"):
        if not 0 < getattr(args, name) <= MAX_TIMEOUT:
            raise ValueError(
                f"--{name.replace('_', '-')} must be a number of seconds above 0 and at most"
                f" {MAX_TIMEOUT:.0f} (a day)"
            )
    stack = StackConfig(
        mtu=args.mtu, connect_timeout=args.connect_timeout, udp_idle_timeout=args.udp_timeout
    )
    enclave = None if args.enclave_name is None else check_name(args.enclave_name)
    return DaemonConfig(
        listen=parse_endpoint(args.listen),
        stack=stack,
        exposes=parse_exposes(args.expose),
        name=enclave,
        state=state_paths(args, enclave),
        nitro_cli=find_nitro_cli(args, enclave),
        enclave_poll=args.enclave_poll,
        exit_with_enclave=args.exit_with_enclave,
        pcap=args.pcap.absolute() if args.pcap else None,
        pcap_max_bytes=(args.pcap_max_mb << 20) or None,
        metrics_listen=parse_metrics_listen(args.metrics_listen) if args.metrics_listen else None,
        busy_poll=args.busy_poll_us / 1e6,
        splice_flows=args.splice_flows,
    )


def state_paths(args: argparse.Namespace, name: str | None) -> StatePaths | None:
    """Where the pidfile and control socket go, or None when nothing asked for state."""
    if name is None and args.state_dir is None and not args.daemonize:
        return None
    root = args.state_dir or DEFAULT_STATE_ROOT
    return StatePaths(root, name or DEFAULT_NAME)


def find_nitro_cli(args: argparse.Namespace, name: str | None) -> str | None:
    """The nitro-cli to follow the enclave with, or None (no name, or not installed).

    Raises:
        ValueError: --exit-with-enclave without a name or a nitro-cli, or an explicit
            --nitro-cli that is not an executable.
    """
    if args.exit_with_enclave and name is None:
        raise ValueError("--exit-with-enclave needs --enclave-name NAME (the enclave to follow)")
    if name is None:
        return None
    found = shutil.which(args.nitro_cli or "nitro-cli")
    if found is None and (args.nitro_cli or args.exit_with_enclave):
        raise ValueError(
            f"{'--exit-with-enclave needs ' if args.exit_with_enclave else ''}nitro-cli: "
            f"{args.nitro_cli or 'nitro-cli'!r} is not an executable on this machine; "
            "install aws-nitro-enclaves-cli or pass --nitro-cli PATH"
        )
    return str(Path(found).absolute()) if found else None


def log_path(args: argparse.Namespace, config: DaemonConfig) -> Path:
    """Where a daemonized daemon logs."""
    if args.log_file is not None:
        return Path(args.log_file)
    assert config.state is not None
    return config.state.log


def _setup_logging(
    args: argparse.Namespace, config: DaemonConfig, daemonized: bool
) -> Callable[[], None] | None:
    """Log to stderr, or to --log-file in the foreground; return what SIGHUP does (None:
    logging to stderr, the daemon's default).

    Raises:
        OSError: the log file cannot be opened.
    """
    setup_logging(PROG, args.log_level)
    if daemonized:  # stdout and stderr are the log file
        path = log_path(args, config)
        return lambda: reopen_log(path, DAEMON_OUTPUT)
    if args.log_file is None:
        return None  # logging to stderr: the daemon's own SIGHUP handling
    root = logging.getLogger()
    stream = os.fdopen(open_log(args.log_file), "a", encoding="utf-8", errors="backslashreplace")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(root.handlers[0].formatter)
    root.handlers[:] = [handler]
    return lambda: reopen_log(args.log_file, (stream.fileno(),))


def main(argv: Sequence[str] | None = None) -> int:
    """Run `nitro-netd-parent`; return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = build_config(args)
    except (EndpointError, ValueError) as exc:
        return fail(PROG, str(exc), 2)
    readiness: Readiness | None = None
    if args.daemonize:
        outcome = _daemonize(args, config)
        if isinstance(outcome, int):
            return outcome
        readiness = outcome
    try:
        on_sighup = _setup_logging(args, config, readiness is not None)
    except OSError as exc:
        return _log_file_failure(args.log_file, exc)
    return _run(config, readiness, on_sighup)


def _log_file_failure(path: Path, exc: OSError) -> int:
    """Report a --log-file that cannot be opened (its directory is never made); exit 2."""
    return fail(PROG, f"cannot open --log-file {path}: {exc.strerror or exc}", 2)


def _daemonize(args: argparse.Namespace, config: DaemonConfig) -> Readiness | int:
    """Fork; in the launcher return the exit status once the daemon reported."""
    assert config.state is not None  # --daemonize always has state
    log = log_path(args, config)
    existed = log.exists()
    try:
        PidLock.check(config.state.pidfile, config.state.name)
        if args.log_file is None:  # the log goes in the state dir: say so if it cannot be made
            create_state_dir(log.parent)
        outcome = daemonize(log)
    except LifecycleError as exc:
        return fail(PROG, str(exc))
    except OSError as exc:
        if args.log_file is not None and str(exc.filename) == str(log):  # as in the foreground
            return _log_file_failure(args.log_file, exc)
        return fail(PROG, f"cannot open the log file {exc.filename}: {exc.strerror}")
    if not isinstance(outcome, tuple):
        return outcome
    status, message = outcome
    if status == 0:
        return 0
    if args.log_file is None:
        remove_new_log(log, existed)
    return fail(PROG, message)


def _run(
    config: DaemonConfig, readiness: Readiness | None, on_sighup: Callable[[], None] | None
) -> int:
    try:
        return run(config, readiness, on_sighup)
    except (LifecycleError, OSError) as exc:
        message = str(exc) if isinstance(exc, LifecycleError) else _describe_os_error(exc)
        if readiness is not None:
            readiness.failed(message)
        return fail(PROG, message)
    except KeyboardInterrupt:
        return 130


def _describe_os_error(exc: OSError) -> str:
    """An OSError for an operator: what failed, on which file, and what to try."""
    if exc.filename is None:
        return str(exc.strerror or exc)
    message = f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, PermissionError):
        message += state_dir_advice()
    return message


def entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


if __name__ == "__main__":
    entry()

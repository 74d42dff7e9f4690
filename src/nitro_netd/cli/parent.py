"""`nitro-netd-parent`: the daemon on the parent instance."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Final

from nitro_netd.cli.common import LOG_LEVELS, fail, setup_logging
from nitro_netd.netstack.config import DEFAULT_MTU, StackConfig
from nitro_netd.parent.daemon import DaemonConfig, run
from nitro_netd.parent.expose import parse_exposes
from nitro_netd.transport import EndpointError, parse_endpoint

PROG: Final = "nitro-netd-parent"

EPILOG: Final = """\
examples:
  nitro-netd-parent                                  listen on vsock port 1024 (the default)
  nitro-netd-parent --listen unix:///run/nnd.sock    listen on a unix socket (the simulator)
  nitro-netd-parent -e 8080:80 -e 2222:22            parent ports 8080, 2222 -> enclave 80, 22

--expose PARENT[:ENCLAVE]: the parent listens on PARENT on all its addresses and opens each
accepted connection to 192.168.127.2:ENCLAVE inside the enclave, which sees the client's
real address (a client on the parent's own loopback appears as 192.168.127.254).
PARENT alone means the same port on both sides; ranges map in order (8000-8009:9000-9009).

The agent inside the enclave (nitro-netd-enclave) or a stock gvforwarder connects to
--listen; the framing (gvproxy POST /connect, or QEMU 4-byte lengths) is detected.
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
        "--mtu", type=int, default=DEFAULT_MTU, help="link MTU (default: %(default)s)"
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
        "--log-level", choices=LOG_LEVELS, default="info", help="default: %(default)s"
    )
    return parser


def build_config(args: argparse.Namespace) -> DaemonConfig:
    """Turn parsed arguments into a frozen config.

    Raises:
        ValueError: an argument is invalid (message says which and why).
    """
    for name in ("connect_timeout", "udp_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    stack = StackConfig(
        mtu=args.mtu, connect_timeout=args.connect_timeout, udp_idle_timeout=args.udp_timeout
    )
    return DaemonConfig(
        listen=parse_endpoint(args.listen), stack=stack, exposes=parse_exposes(args.expose)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run `nitro-netd-parent`; return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = build_config(args)
    except (EndpointError, ValueError) as exc:
        return fail(PROG, str(exc), 2)
    setup_logging(PROG, args.log_level)
    try:
        return run(config)
    except OSError as exc:
        return fail(PROG, f"{exc.strerror or exc}")
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


if __name__ == "__main__":
    entry()

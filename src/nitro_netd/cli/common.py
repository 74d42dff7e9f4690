"""Helpers shared by the command-line entry points: logging setup, error exits and the
``--mtu`` argument."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Final

from nitro_netd.link import MAX_MTU, MIN_MTU, parse_mtu

LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def mtu_argument(text: str) -> int:
    """The ``--mtu`` value of every command (daemon, agent, demo, simulator), as an argparse
    ``type``: a whole number from `MIN_MTU` to `MAX_MTU` (MTU + 14 must fit the link's 2-byte
    frame length).

    Raises:
        argparse.ArgumentTypeError: anything else, with the one message all commands give.
    """
    mtu = parse_mtu(text)
    if mtu is None:
        raise argparse.ArgumentTypeError(
            f"invalid MTU {text!r}: give a whole number from {MIN_MTU} to {MAX_MTU} "
            "(MTU + 14 must fit the link's 2-byte frame length)"
        )
    return mtu


def setup_logging(prog: str, level: str) -> None:
    """Log one line per event to stderr, prefixed with the program name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prog}: %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def fail(prog: str, message: str, status: int = 1) -> int:
    """Print a one-line error for the user and return the exit status to use."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status

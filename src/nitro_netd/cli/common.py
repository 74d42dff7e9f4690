"""Helpers shared by the command-line entry points: logging setup and error exits."""

from __future__ import annotations

import logging
import sys
from typing import Final

LOG_LEVELS: Final = ("debug", "info", "warning", "error")


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

"""Log lines that name their flow, e.g. `[tcp 192.168.127.2:41234→198.18.0.2:80] ...`."""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any


class FlowLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the flow's name: given, or made by `name()` when the flow
    first logs (most TCP flows log nothing at the default level, and formatting their
    addresses would cost every connection)."""

    def __init__(self, logger: logging.Logger, name: str | Callable[[], str]) -> None:
        super().__init__(logger)
        self._name = name

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        if callable(self._name):
            self._name = self._name()
        return f"[{self._name}] {msg}", kwargs


def flow_logger(logger: logging.Logger, name: str) -> FlowLogger:
    """A logger adapter for the flow called `name`."""
    return FlowLogger(logger, name)

"""The parent daemon: the asyncio shell around the netstack."""

from __future__ import annotations

from nitro_netd.parent.daemon import DaemonConfig, run, serve

__all__ = ["DaemonConfig", "run", "serve"]

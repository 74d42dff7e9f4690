"""TCP: the translator between the enclave's kernel TCP and host sockets."""

from __future__ import annotations

from nitro_netd.netstack.tcp.layer import TCP_EVENTS, TcpLayer

__all__ = ["TCP_EVENTS", "TcpLayer"]

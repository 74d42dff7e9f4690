"""The sans-IO network stack of the parent daemon.

This package contains no I/O: no sockets, no clock, no asyncio. The caller passes frames,
host events and the time in, and after **every** call drains the stack (`NetStack.drain()`,
or `frames_to_send()` and `commands_to_send()`) and re-arms its timer from
`NetStack.get_timer()`.
"""

from __future__ import annotations

from nitro_netd.netstack.config import DEFAULT_MTU, StackConfig
from nitro_netd.netstack.events import (
    FlowId,
    HostCommand,
    HostEvent,
    PingClose,
    PingFailed,
    PingReply,
    PingSend,
    TcpAccepted,
    TcpClose,
    TcpConnect,
    TcpConnected,
    TcpData,
    TcpEof,
    TcpFailed,
    TcpPauseReading,
    TcpRelease,
    TcpResumeReading,
    TcpSend,
    TcpShutdown,
    TcpWriteBlocked,
    TcpWriteUnblocked,
    UdpClose,
    UdpDatagram,
    UdpFailed,
    UdpSend,
)
from nitro_netd.netstack.stack import NetStack
from nitro_netd.netstack.stats import StackStats

__all__ = [
    "DEFAULT_MTU",
    "FlowId",
    "HostCommand",
    "HostEvent",
    "NetStack",
    "PingClose",
    "PingFailed",
    "PingReply",
    "PingSend",
    "StackConfig",
    "StackStats",
    "TcpAccepted",
    "TcpClose",
    "TcpConnect",
    "TcpConnected",
    "TcpData",
    "TcpEof",
    "TcpFailed",
    "TcpPauseReading",
    "TcpRelease",
    "TcpResumeReading",
    "TcpSend",
    "TcpShutdown",
    "TcpWriteBlocked",
    "TcpWriteUnblocked",
    "UdpClose",
    "UdpDatagram",
    "UdpFailed",
    "UdpSend",
]

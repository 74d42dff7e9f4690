"""The seam between the sans-IO netstack and its I/O shell.

Commands go out of the netstack (`commands_to_send()`); the shell executes them on real
host sockets and feeds what happens back in as events (`handle_host_event()`). Both are
small frozen values. Flows are named by an integer the netstack allocates.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from nitro_netd.netstack.spans import HostSpan

FlowId = int
SHELL_FLOW_BASE = 1 << 48
"""Flows the shell opens (accepted clients) take ids from here up; the stack's start at 1."""


# --- commands: netstack -> shell -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcpConnect:
    """Open a host TCP connection for `flow` to `address:port`, giving up after `timeout`."""

    flow: FlowId
    address: IPv4Address
    port: int
    timeout: float


@dataclass(frozen=True, slots=True)
class TcpSend:
    """Write `chunks`, in order, to the flow's host socket (the shell buffers what the kernel
    won't take).

    A chunk may be a view into the enclave's frame it came from, so the bytes are copied
    once, by the kernel: it is valid only until the shell's flush that drains this command
    returns, and the shell copies whatever it keeps.
    """

    flow: FlowId
    chunks: tuple[bytes | memoryview, ...]

    @property
    def data(self) -> bytes:
        """All chunks as one bytes object (a copy: for tests and logs)."""
        return b"".join(self.chunks)


@dataclass(frozen=True, slots=True)
class TcpShutdown:
    """Half-close the host socket: shutdown(SHUT_WR) once queued data is written."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class TcpClose:
    """Close the host socket; with `reset`, abort it (SO_LINGER 0, so the peer sees RST)."""

    flow: FlowId
    reset: bool = False


@dataclass(frozen=True, slots=True)
class TcpPauseReading:
    """Stop reading the flow's host socket: the enclave is not taking data fast enough."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class TcpRelease:
    """The enclave acknowledged every byte before stream position `position`, and the flow
    holds no `HostSpan` any more: the shell may let go of the bytes it kept for it."""

    flow: FlowId
    position: int


@dataclass(frozen=True, slots=True)
class TcpResumeReading:
    """Read the flow's host socket again."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class UdpSend:
    """Send one datagram from the flow's host socket to `address:port`."""

    flow: FlowId
    address: IPv4Address
    port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class UdpClose:
    """Close the flow's host UDP socket (idle expiry)."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class UdpReply:
    """Send a datagram from the exposed UDP port `parent_port` to the client `address:port`."""

    parent_port: int
    address: IPv4Address
    port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PingSend:
    """Send an ICMP echo request from the flow's unprivileged ping socket to `address`.

    The kernel picks the identifier; replies come back as `PingReply` for the same flow.
    """

    flow: FlowId
    address: IPv4Address
    sequence: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PingClose:
    """Close the flow's ping socket (idle expiry)."""

    flow: FlowId


HostCommand = (
    TcpConnect
    | TcpSend
    | TcpShutdown
    | TcpClose
    | TcpPauseReading
    | TcpResumeReading
    | TcpRelease
    | UdpSend
    | UdpClose
    | UdpReply
    | PingSend
    | PingClose
)


# --- events: shell -> netstack ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcpConnected:
    """The host connect of `flow` succeeded."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class TcpData:
    """Bytes arrived on the flow's host socket (or a span of them the shell keeps)."""

    flow: FlowId
    data: bytes | HostSpan


@dataclass(frozen=True, slots=True)
class TcpEof:
    """The host peer half-closed (recv returned 0)."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class TcpFailed:
    """The host socket failed: refused, unreachable, timed out or reset (`errno`)."""

    flow: FlowId
    errno: int
    data_lost: bool = False
    """The shell lost bytes it kept for the stack (`HostSpan`): reset at once, since they
    cannot be delivered."""


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """A datagram arrived on the flow's host UDP socket from `address:port`."""

    flow: FlowId
    address: IPv4Address
    port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TcpAccepted:
    """A client connected to an exposed port; open a flow to the enclave's `enclave_port`.

    The shell chose `flow` (from its own range, see `SHELL_FLOW_BASE`); the host socket is
    not read until the stack sends `TcpResumeReading`.
    """

    flow: FlowId
    address: IPv4Address
    port: int
    enclave_port: int


@dataclass(frozen=True, slots=True)
class TcpWriteBlocked:
    """The shell holds more unwritten bytes for the flow than its high-water mark."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class TcpWriteUnblocked:
    """The flow's unwritten bytes fell below the low-water mark."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class UdpInbound:
    """A client sent a datagram to the exposed UDP port `parent_port` (for `enclave_port`)."""

    parent_port: int
    address: IPv4Address
    port: int
    enclave_port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class UdpFailed:
    """The flow's host UDP socket reported an error (`errno`), e.g. ECONNREFUSED from ICMP."""

    flow: FlowId
    errno: int


@dataclass(frozen=True, slots=True)
class PingReply:
    """An ICMP echo reply arrived on the flow's ping socket."""

    flow: FlowId
    sequence: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PingFailed:
    """The flow's ping socket reported an error (unreachable, or no permission to open it)."""

    flow: FlowId
    errno: int


HostEvent = (
    TcpAccepted
    | TcpConnected
    | TcpData
    | TcpEof
    | TcpFailed
    | TcpWriteBlocked
    | TcpWriteUnblocked
    | UdpDatagram
    | UdpInbound
    | UdpFailed
    | PingReply
    | PingFailed
)

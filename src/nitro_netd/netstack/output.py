"""The stack's output queues, shared by every protocol layer.

Layers never build Ethernet or hold queues themselves: they call `send_ipv4()` and
`send_command()` here, and the shell drains both after each call into the stack.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.ethernet import EtherType, MacAddress, build_ethernet
from nitro_netd.frames.ipv4 import build_ipv4_header
from nitro_netd.netstack.config import StackConfig
from nitro_netd.netstack.events import HostCommand
from nitro_netd.netstack.spans import HostSlice
from nitro_netd.netstack.stats import StackStats

_MIN_FRAME: Final = 60
"""Ethernet's minimum frame without FCS; shorter frames are zero-padded."""
TSO_MAX_PAYLOAD: Final = 0xFFFF - 14 - 20 - 20
"""With segmentation offload: the most TCP payload in one frame (a link frame's 2-byte
length, less the Ethernet, IPv4 and TCP headers of a data segment, which has no options)."""


class SplitFrame:
    """A frame kept as its headers and a view of its payload, so the payload is never copied
    on its way from a flow's send queue to the link (the shell writes both with writev), or
    a `HostSlice` of bytes the shell holds (it splices them)."""

    __slots__ = ("head", "length", "payload")

    def __init__(
        self, head: bytes | bytearray, payload: bytes | bytearray | memoryview | HostSlice
    ) -> None:
        self.head = head
        self.payload = payload
        self.length = len(head) + len(payload)

    def __len__(self) -> int:
        return self.length

    def __bytes__(self) -> bytes:
        return bytes(self.head) + bytes(self.payload)


Frame = bytes | bytearray | SplitFrame
"""A frame for the enclave: whole, or split into headers and payload."""


class StackOutput:
    """Frames for the enclave and commands for the host, in the order they were queued."""

    def __init__(self, config: StackConfig, stats: StackStats) -> None:
        self.config = config
        self.stats = stats
        self.frames: list[Frame] = []
        self.commands: list[HostCommand] = []
        self.neighbours: dict[IPv4Address, MacAddress] = {}
        self.checksum_offload = False
        """Set per link: the agent marks our TCP frames CHECKSUM_PARTIAL (so they carry only
        the pseudo-header sum) and its TAP may hand us TCP/UDP with partial checksums (so
        those are not verified)."""
        self.segmentation_offload = False
        """Set per link: the agent has the enclave's kernel take our TCP frames as GSO packets,
        so a segment may carry up to `segment_size()` bytes whatever the enclave's MSS."""
        self._identification = 0

    def segment_size(self, mss: int) -> int:
        """Most payload bytes per TCP segment to an enclave flow whose MSS is `mss`.

        With segmentation offload: as many whole MSS as fit in one link frame.
        """
        if not self.segmentation_offload or mss >= TSO_MAX_PAYLOAD:
            return mss
        return TSO_MAX_PAYLOAD // mss * mss

    def enclave_mac(self) -> MacAddress:
        """The enclave's MAC: learned from ARP, else the configured one."""
        return self.neighbours.get(self.config.enclave_ip, self.config.enclave_mac)

    def ethernet_header(self, ethertype: int) -> bytes:
        """The 14-byte header of a frame from the gateway to the enclave."""
        return build_ethernet(self.enclave_mac(), self.config.gateway_mac, ethertype, b"")

    def send_frame(self, frame: Frame) -> None:
        """Queue a frame (already addressed) for the enclave."""
        size = len(frame)
        if size < _MIN_FRAME and not isinstance(frame, SplitFrame):
            # (A split frame this short has a payload the shell holds, which cannot be
            # joined here: it goes out short, as a TAP and the agents take it.)
            frame = bytes(frame) + bytes(_MIN_FRAME - size)
            size = _MIN_FRAME
        self.stats.frames_out += 1
        self.stats.bytes_out += size
        self.frames.append(frame)

    def send_ethernet(self, ethertype: int, payload: bytes) -> None:
        """Queue a frame to the enclave from the gateway MAC."""
        self.send_frame(self.ethernet_header(ethertype) + payload)

    def next_identification(self) -> int:
        """A fresh IPv4 identification value."""
        self._identification = (self._identification + 1) & 0xFFFF
        return self._identification

    def send_ipv4(
        self, source: IPv4Address, destination: IPv4Address, protocol: int, payload: bytes
    ) -> None:
        """Queue an IPv4 packet to the enclave."""
        header = build_ipv4_header(
            source, destination, protocol, len(payload), identification=self.next_identification()
        )
        self.send_ethernet(EtherType.IPV4, header + payload)

    def send_command(self, command: HostCommand) -> None:
        """Queue a command for the shell."""
        self.commands.append(command)

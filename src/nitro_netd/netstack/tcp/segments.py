"""Building TCP/IPv4 frames for the enclave quickly.

The data path builds one frame per segment. With checksum offload and no TCP options (every
segment after the handshake) all three headers are one `struct` pack (the IPv4 checksum
from a precomputed sum of the fixed words); a large payload is left where it is, in the
flow's send buffer (`SplitFrame`), and a small one (or none: an ACK) is joined after them.
Otherwise the headers are packed into a new frame, a small payload is copied after them,
and the payload's checksum is summed once (numpy when present). A payload the shell holds
(`HostSlice`) is always left where it is: it needs checksum offload.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.checksum import fold, ones_complement_sum
from nitro_netd.frames.ethernet import EtherType, MacAddress
from nitro_netd.frames.ipv4 import DEFAULT_TTL, IpProto
from nitro_netd.frames.tcp import TcpOptions, build_tcp_options
from nitro_netd.netstack.output import SplitFrame
from nitro_netd.netstack.spans import HostSlice

_ETH: Final = struct.Struct("!6s6sH")
_IP: Final = struct.Struct("!BBHHHBBH4s4s")
_TCP: Final = struct.Struct("!HHIIBBHHH")
_FOLD: Final = 0xFFFF
ETH_IP_TCP_LEN: Final = 14 + 20 + 20
SPLIT_MIN: Final = 2048
"""Payloads at least this long are not copied into the frame (see `SplitFrame`)."""
_FLAG_DF: Final = 0x4000
_HEADERS: Final = struct.Struct("!14sBBHHHBBH4s4sHHIIBBHHH")
"""Ethernet, IPv4 and TCP headers without options, packed in one call (the split path)."""
_DATA_OFFSET: Final = 5 << 4


class SegmentBuilder:
    """Builds frames for one flow: fixed MACs, addresses and ports."""

    def __init__(
        self,
        partial_checksum: bool,
        enclave_mac: MacAddress,
        gateway_mac: MacAddress,
        source: IPv4Address,
        destination: IPv4Address,
        source_port: int,
        destination_port: int,
    ) -> None:
        self.partial_checksum = partial_checksum
        """Leave only the pseudo-header sum in the TCP checksum (the agent marks the frame
        CHECKSUM_PARTIAL: checksum offload negotiated for this link)."""
        self.source_port = source_port
        self.destination_port = destination_port
        self._eth = _ETH.pack(enclave_mac.octets, gateway_mac.octets, EtherType.IPV4)
        self._src = source.packed
        self._dst = destination.packed
        addresses = self._src + self._dst
        self._address_sum = ones_complement_sum(addresses)
        self._ip_constant_sum = 0x4500 + _FLAG_DF + (DEFAULT_TTL << 8 | IpProto.TCP)
        self._ip_constant_sum += self._address_sum
        """The IPv4 header's words that never change, summed: its checksum is this plus
        the total length and the identification, folded."""
        self._ident = 0

    def build(
        self,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes | bytearray | memoryview | HostSlice = b"",
        options: TcpOptions | None = None,
    ) -> bytes | bytearray | SplitFrame:
        """Return an Ethernet frame carrying one TCP segment.

        With checksum offload and no options (every segment after the handshake), the
        headers are one `struct` pack; a payload of `SPLIT_MIN` bytes or more is then not
        copied: the frame comes back as a `SplitFrame` of the headers and the payload.
        """
        if options is None and self.partial_checksum:
            head = self._pack_headers(seq, ack, flags, window, len(payload))
            if isinstance(payload, HostSlice) or len(payload) >= SPLIT_MIN:
                return SplitFrame(head, payload)
            return head + payload if payload else head
        if isinstance(payload, HostSlice):
            raise TypeError("a payload the shell holds needs checksum offload")
        opts = build_tcp_options(options) if options is not None else b""
        tcp_len = 20 + len(opts) + len(payload)
        split = len(payload) >= SPLIT_MIN
        frame = bytearray(ETH_IP_TCP_LEN + len(opts) + (0 if split else len(payload)))
        frame[:14] = self._eth
        self._ident = (self._ident + 1) & 0xFFFF
        _IP.pack_into(
            frame,
            14,
            0x45,
            0,
            20 + tcp_len,
            self._ident,
            _FLAG_DF,
            DEFAULT_TTL,
            IpProto.TCP,
            0,
            self._src,
            self._dst,
        )
        ip_sum = ones_complement_sum(memoryview(frame)[14:34])
        struct.pack_into("!H", frame, 24, ~ip_sum & _FOLD)
        header_words = (20 + len(opts)) // 4
        _TCP.pack_into(
            frame,
            34,
            self.source_port,
            self.destination_port,
            seq,
            ack,
            header_words << 4,
            flags,
            window,
            0,
            0,
        )
        if opts:
            frame[54 : 54 + len(opts)] = opts
        pseudo = self._address_sum + IpProto.TCP + tcp_len
        if payload and not split:
            frame[54 + len(opts) :] = payload
        if self.partial_checksum:
            struct.pack_into("!H", frame, 50, fold(pseudo))
        else:
            if split:
                pseudo += ones_complement_sum(payload)
            total = ones_complement_sum(memoryview(frame)[34:], pseudo)
            struct.pack_into("!H", frame, 50, ~total & _FOLD)  # already folded
        return SplitFrame(frame, payload) if split else frame

    def _pack_headers(self, seq: int, ack: int, flags: int, window: int, length: int) -> bytes:
        """The data path's common case, in one pack: no options, checksum offload (only the
        pseudo-header sum in the TCP checksum), a payload of `length` bytes to follow."""
        tcp_len = 20 + length
        total = 20 + tcp_len
        ident = self._ident = (self._ident + 1) & 0xFFFF
        return _HEADERS.pack(
            self._eth,
            0x45,
            0,
            total,
            ident,
            _FLAG_DF,
            DEFAULT_TTL,
            IpProto.TCP,
            ~fold(self._ip_constant_sum + total + ident) & _FOLD,
            self._src,
            self._dst,
            self.source_port,
            self.destination_port,
            seq,
            ack,
            _DATA_OFFSET,
            flags,
            window,
            fold(self._address_sum + IpProto.TCP + tcp_len),
            0,
        )

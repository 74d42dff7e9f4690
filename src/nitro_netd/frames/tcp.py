"""TCP segments over IPv4 (RFC 9293 §3.1) with the options a SYN carries (RFC 7323, RFC 2018).

Options are decoded into `TcpOptions`; SACK blocks and unknown kinds are skipped by length.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.checksum import internet_checksum
from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.frames.ipv4 import IpProto, pseudo_header_sum

TCP_HEADER_LEN: Final = 20
MAX_TCP_LEN: Final = 0xFFFF
"""The pseudo-header's 16-bit length field bounds a segment."""
MAX_WINDOW_SCALE: Final = 14
"""RFC 7323 §2.3: a larger shift count is used as 14."""
_HEADER: Final = struct.Struct("!HHIIBBHHH")
_MIN_DATA_OFFSET: Final = 5


class TcpFlags(enum.IntFlag):
    """The control bits (RFC 9293 §3.1; ECE and CWR from RFC 3168 §23.2)."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


class TcpOptionKind(enum.IntEnum):
    """Option kinds (IANA "TCP Option Kind Numbers") the codec knows by name."""

    EOL = 0
    NOP = 1
    MSS = 2
    WINDOW_SCALE = 3
    SACK_PERMITTED = 4
    SACK = 5
    TIMESTAMPS = 8


_OPTION_LENGTHS: Final[dict[int, int]] = {
    TcpOptionKind.MSS: 4,
    TcpOptionKind.WINDOW_SCALE: 3,
    TcpOptionKind.SACK_PERMITTED: 2,
    TcpOptionKind.TIMESTAMPS: 10,
}
"""The only valid total length of each option we decode (kind and length bytes included)."""


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """The options the stack acts on; absent ones are None (or False)."""

    mss: int | None = None
    """Maximum segment size (RFC 9293 §3.7.1)."""
    window_scale: int | None = None
    """Shift count (RFC 7323 §2), at most 14 once parsed."""
    sack_permitted: bool = False
    """SACK-permitted (RFC 2018 §2)."""
    timestamps: tuple[int, int] | None = None
    """(TSval, TSecr) (RFC 7323 §3)."""


@dataclass(frozen=True, slots=True)
class TcpHeader:
    """A TCP header. `data_offset` is in 32-bit words, as on the wire."""

    source_port: int
    destination_port: int
    seq: int
    ack: int
    flags: TcpFlags
    window: int
    data_offset: int
    options: TcpOptions

    @property
    def header_length(self) -> int:
        """The header's length in bytes, options included."""
        return self.data_offset * 4


# RFC 9293 §3.1 (header format), §3.2 (option rules: unknown kinds skipped by length).
def parse_tcp(
    data: bytes | bytearray | memoryview,
    *,
    source: IPv4Address,
    destination: IPv4Address,
    verify_checksum: bool = True,
) -> tuple[TcpHeader, memoryview]:
    """Decode a TCP segment carried in an IPv4 packet from `source` to `destination`.

    Args:
        data: the IPv4 payload (the whole segment, nothing after it).
        source: the IPv4 source address (for the pseudo-header).
        destination: the IPv4 destination address.
        verify_checksum: False when the link vouches for the checksum.

    Returns:
        The header and a view of the payload.

    Raises:
        FrameError: truncated, a data offset below 5 or past the end, a bad checksum, or
            malformed options. Raising anything else is a bug.
    """
    n = len(data)
    if n < TCP_HEADER_LEN:
        raise FrameError(DropReason.TRUNCATED, f"TCP of {n} bytes")
    if n > MAX_TCP_LEN:
        raise FrameError(DropReason.BAD_HEADER, f"TCP of {n} bytes exceeds {MAX_TCP_LEN}")
    sport, dport, seq, ack, offset_byte, flags, window, _csum, _urg = _HEADER.unpack_from(data)
    data_offset = offset_byte >> 4
    if data_offset < _MIN_DATA_OFFSET:
        raise FrameError(DropReason.BAD_HEADER, f"TCP data offset {data_offset}")
    header_length = data_offset * 4
    if header_length > n:
        raise FrameError(DropReason.TRUNCATED, f"TCP data offset {data_offset} of {n} bytes")
    view = memoryview(data)
    if verify_checksum:
        initial = pseudo_header_sum(source, destination, IpProto.TCP, n)
        if internet_checksum(view, initial) != 0:
            raise FrameError(DropReason.BAD_CHECKSUM, "TCP checksum")
    options = parse_tcp_options(view[TCP_HEADER_LEN:header_length])
    header = TcpHeader(sport, dport, seq, ack, TcpFlags(flags), window, data_offset, options)
    return header, view[header_length:]


# RFC 9293 §3.2 (EOL, NOP, MSS), RFC 7323 §2.2 and §3.2 (WS, TS), RFC 2018 §2 (SACK-permitted).
def parse_tcp_options(raw: bytes | bytearray | memoryview) -> TcpOptions:
    """Decode an option area (the bytes between the fixed header and the data).

    Raises:
        FrameError: an option length below 2, past the area, or wrong for its kind.
    """
    mss: int | None = None
    window_scale: int | None = None
    sack_permitted = False
    timestamps: tuple[int, int] | None = None
    i, end = 0, len(raw)
    while i < end:
        kind = raw[i]
        if kind == TcpOptionKind.EOL:
            break
        if kind == TcpOptionKind.NOP:
            i += 1
            continue
        length = raw[i + 1] if i + 1 < end else 0
        if length < 2 or i + length > end or _OPTION_LENGTHS.get(kind, length) != length:
            raise FrameError(DropReason.BAD_HEADER, f"TCP option kind={kind} length={length}")
        if kind == TcpOptionKind.MSS:
            (mss,) = struct.unpack_from("!H", raw, i + 2)
        elif kind == TcpOptionKind.WINDOW_SCALE:
            window_scale = min(raw[i + 2], MAX_WINDOW_SCALE)
        elif kind == TcpOptionKind.SACK_PERMITTED:
            sack_permitted = True
        elif kind == TcpOptionKind.TIMESTAMPS:
            timestamps = struct.unpack_from("!II", raw, i + 2)
        i += length
    return TcpOptions(mss, window_scale, sack_permitted, timestamps)


def build_tcp_options(options: TcpOptions) -> bytes:
    """Encode options in Linux's SYN layout, padded with NOPs to a multiple of 4 bytes."""
    out = bytearray()
    if options.mss is not None:
        out += struct.pack("!BBH", TcpOptionKind.MSS, 4, options.mss)
    if options.sack_permitted and options.timestamps is not None:
        out += struct.pack("!BBBB", TcpOptionKind.SACK_PERMITTED, 2, TcpOptionKind.TIMESTAMPS, 10)
    elif options.sack_permitted:
        out += struct.pack("!BBBB", TcpOptionKind.NOP, TcpOptionKind.NOP, 4, 2)
    elif options.timestamps is not None:
        out += struct.pack("!BBBB", TcpOptionKind.NOP, TcpOptionKind.NOP, 8, 10)
    if options.timestamps is not None:
        out += struct.pack("!II", *options.timestamps)
    if options.window_scale is not None:
        out += struct.pack(
            "!BBBB", TcpOptionKind.NOP, TcpOptionKind.WINDOW_SCALE, 3, options.window_scale
        )
    return bytes(out)


def build_tcp(
    source: IPv4Address,
    destination: IPv4Address,
    source_port: int,
    destination_port: int,
    seq: int,
    ack: int,
    flags: TcpFlags,
    window: int,
    options: TcpOptions | None = None,
    payload: bytes | bytearray | memoryview = b"",
) -> bytes:
    """Return a TCP segment with its checksum over the IPv4 pseudo-header.

    Raises:
        ValueError: the segment would exceed 65535 bytes.
        struct.error: a field does not fit its width (a caller bug).
    """
    encoded = build_tcp_options(options) if options is not None else b""
    header_length = TCP_HEADER_LEN + len(encoded)
    length = header_length + len(payload)
    if length > MAX_TCP_LEN:
        raise ValueError(f"TCP segment of {length} bytes exceeds {MAX_TCP_LEN}")
    offset_byte = (header_length // 4) << 4
    raw = bytearray(
        _HEADER.pack(source_port, destination_port, seq, ack, offset_byte, flags, window, 0, 0)
    )
    raw += encoded
    raw += payload
    checksum = internet_checksum(raw, pseudo_header_sum(source, destination, IpProto.TCP, length))
    struct.pack_into("!H", raw, 16, checksum)
    return bytes(raw)

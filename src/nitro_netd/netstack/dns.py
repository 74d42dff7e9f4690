"""A minimal DNS message codec (RFC 1035): the header, the first question, and the few
replies the gateway builds itself (SERVFAIL, the host names' local answers).

Everything else is forwarded as raw bytes, so this codec never needs to understand
resource records: the enclave's queries and the upstream answers pass through unchanged.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final

from nitro_netd.frames.errors import DropReason, FrameError
from nitro_netd.netstack.config import StackConfig

DNS_PORT: Final = 53
HEADER_LEN: Final = 12
MAX_NAME: Final = 255
"""RFC 1035 §2.3.4: a name's wire form is at most 255 bytes."""
LOCAL_TTL: Final = 60
"""Seconds the enclave may cache a host name's local answer."""
_HEADER: Final = struct.Struct("!HHHHHH")
_QUESTION_TAIL: Final = struct.Struct("!HH")
_A_RECORD: Final = struct.Struct("!HHIH")
_POINTER_TO_QUESTION: Final = b"\xc0\x0c"
_MAX_POINTERS: Final = 16

_QR: Final = 0x8000
_OPCODE_MASK: Final = 0x7800
_AA: Final = 0x0400
_TC: Final = 0x0200
_RD: Final = 0x0100
_RA: Final = 0x0080


class RRType(enum.IntEnum):
    """Resource record types (RFC 1035 §3.2.2, RFC 3596) the gateway knows by name."""

    A = 1
    AAAA = 28


class RCode(enum.IntEnum):
    """Response codes (RFC 1035 §4.1.1)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3


CLASS_IN: Final = 1


@dataclass(frozen=True, slots=True)
class DnsHeader:
    """The 12-byte DNS header (RFC 1035 §4.1.1)."""

    id: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int

    @property
    def is_response(self) -> bool:
        """The QR bit."""
        return bool(self.flags & _QR)

    @property
    def opcode(self) -> int:
        """0 for a standard query."""
        return (self.flags & _OPCODE_MASK) >> 11

    @property
    def rcode(self) -> int:
        """The response code (low 4 bits)."""
        return self.flags & 0xF


@dataclass(frozen=True, slots=True)
class DnsQuestion:
    """A question (RFC 1035 §4.1.2); `labels` as on the wire, without the root label."""

    labels: tuple[bytes, ...]
    qtype: int
    qclass: int

    @property
    def name(self) -> str:
        """The name as text, for logs."""
        return ".".join(label.decode("ascii", "backslashreplace") for label in self.labels)


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """A message's header and its first question."""

    header: DnsHeader
    question: DnsQuestion


def parse_header(data: bytes | bytearray | memoryview) -> DnsHeader:
    """Decode the DNS header.

    Raises:
        FrameError: fewer than 12 bytes.
    """
    if len(data) < HEADER_LEN:
        raise FrameError(DropReason.TRUNCATED, f"DNS message of {len(data)} bytes")
    return DnsHeader(*_HEADER.unpack_from(data))


def parse_name(data: bytes | bytearray | memoryview, offset: int) -> tuple[tuple[bytes, ...], int]:
    """Decode a domain name at `offset`, following compression pointers (RFC 1035 §4.1.4).

    Returns:
        The labels and the offset just past the name where it started.

    Raises:
        FrameError: truncated, a reserved label type, a pointer loop, or over 255 bytes.
    """
    labels: list[bytes] = []
    end: int | None = None
    wire_length, pointers = 1, 0
    while True:
        if offset >= len(data):
            raise FrameError(DropReason.TRUNCATED, "DNS name runs past the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise FrameError(DropReason.TRUNCATED, "DNS name pointer cut short")
            pointers += 1
            if pointers > _MAX_POINTERS:
                raise FrameError(DropReason.BAD_HEADER, "DNS name pointer loop")
            end = offset + 2 if end is None else end
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length & 0xC0:
            raise FrameError(DropReason.BAD_HEADER, f"DNS label type {length >> 6}")
        if length == 0:
            return tuple(labels), offset + 1 if end is None else end
        wire_length += length + 1
        if wire_length > MAX_NAME:
            raise FrameError(DropReason.BAD_HEADER, "DNS name over 255 bytes")
        if offset + 1 + length > len(data):
            raise FrameError(DropReason.TRUNCATED, "DNS label runs past the message")
        labels.append(bytes(data[offset + 1 : offset + 1 + length]))
        offset += 1 + length


def parse_query(data: bytes | bytearray | memoryview) -> DnsQuery:
    """Decode a message's header and first question (enough to answer or refuse it).

    Raises:
        FrameError: truncated or malformed, or no question. Raising anything else is a bug.
    """
    header = parse_header(data)
    if header.qdcount == 0:
        raise FrameError(DropReason.BAD_HEADER, "DNS message without a question")
    labels, offset = parse_name(data, HEADER_LEN)
    if offset + _QUESTION_TAIL.size > len(data):
        raise FrameError(DropReason.TRUNCATED, "DNS question cut short")
    qtype, qclass = _QUESTION_TAIL.unpack_from(data, offset)
    return DnsQuery(header, DnsQuestion(labels, qtype, qclass))


def build_name(labels: tuple[bytes, ...]) -> bytes:
    """Encode a name without compression."""
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def build_query(ident: int, question: DnsQuestion, *, recursion: bool = True) -> bytes:
    """Encode a standard query with one question."""
    flags = _RD if recursion else 0
    return _HEADER.pack(ident, flags, 1, 0, 0, 0) + _build_question(question)


def build_servfail(query: DnsQuery) -> bytes:
    """The SERVFAIL answer to `query`: same ID, opcode, RD and question, RCODE 2."""
    return _build_response(query, RCode.SERVFAIL, answers=b"", count=0)


def truncate_response(response: bytes | bytearray | memoryview, query: DnsQuery) -> bytes:
    """`response` cut to its header and `query`'s question, with TC set (RFC 1035 §4.1.1,
    RFC 2181 §9): the answer does not fit the link, so the client asks again over TCP.

    Raises:
        FrameError: `response` is shorter than a DNS header.
    """
    header = parse_header(response)
    return _HEADER.pack(header.id, header.flags | _TC, 1, 0, 0, 0) + _build_question(query.question)


def build_local_answer(query: DnsQuery, address: IPv4Address) -> bytes:
    """The gateway's authoritative answer for one of its own names.

    An A question in class IN gets `address`; every other type gets NOERROR with no answer
    (the name exists, it has no such record), so resolvers never conclude NXDOMAIN.
    """
    question = query.question
    if question.qtype != RRType.A or question.qclass != CLASS_IN:
        return _build_response(query, RCode.NOERROR, answers=b"", count=0, authoritative=True)
    record = _POINTER_TO_QUESTION + _A_RECORD.pack(RRType.A, CLASS_IN, LOCAL_TTL, 4)
    return _build_response(
        query, RCode.NOERROR, answers=record + address.packed, count=1, authoritative=True
    )


def is_local_name(config: StackConfig, question: DnsQuestion) -> bool:
    """True if the question asks about one of `config.host_names` (ASCII case-insensitive)."""
    asked = tuple(label.lower() for label in question.labels)
    return any(asked == _labels_of(name) for name in config.host_names)


def dns_upstream_for_tcp(config: StackConfig) -> IPv4Address | None:
    """The resolver that TCP DNS to the gateway is relayed to, at `config.dns_port`.

    Returns:
        The first of the parent's resolvers, or None when it has none (refuse the connect).
    """
    return config.dns_servers[0] if config.dns_servers else None


def _labels_of(name: str) -> tuple[bytes, ...]:
    return tuple(label.encode("ascii").lower() for label in name.rstrip(".").split(".") if label)


def _build_question(question: DnsQuestion) -> bytes:
    return build_name(question.labels) + _QUESTION_TAIL.pack(question.qtype, question.qclass)


def _build_response(
    query: DnsQuery, rcode: RCode, *, answers: bytes, count: int, authoritative: bool = False
) -> bytes:
    header = query.header
    flags = _QR | _RA | (header.flags & (_OPCODE_MASK | _RD)) | rcode
    if authoritative:
        flags |= _AA
    head = _HEADER.pack(header.id, flags, 1, count, 0, 0)
    return head + _build_question(query.question) + answers

"""Codec errors and the reasons a frame is dropped."""

from __future__ import annotations

import enum


class DropReason(enum.Enum):
    """Why a frame from (or for) the enclave was not acted on. Every drop is counted by
    reason."""

    TRUNCATED = "truncated"
    """Shorter than its headers or its own length fields say."""
    BAD_CHECKSUM = "bad_checksum"
    """An IPv4 header or L4 checksum did not verify."""
    BAD_HEADER = "bad_header"
    """A header field has a value the protocol forbids (version, IHL, data offset...)."""
    FRAGMENT = "fragment"
    """IPv4 fragments are not reassembled (the link's MTU makes them pointless)."""
    UNSUPPORTED_ETHERTYPE = "unsupported_ethertype"
    """An EtherType we do not handle (IPv6 for now, LLDP, ...)."""
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    """An IP protocol we do not handle (SCTP, GRE, ...)."""
    UNSUPPORTED_ARP = "unsupported_arp"
    """ARP that is not Ethernet/IPv4 request or reply."""
    NOT_FOR_US = "not_for_us"
    """Addressed to a MAC or IP the stack does not own or route."""
    BAD_SOURCE = "bad_source"
    """A source address the enclave may not use (broadcast, multicast, outside the subnet)."""
    UNSUPPORTED_ICMP = "unsupported_icmp"
    """An ICMP type we do not act on."""
    NOT_IMPLEMENTED = "not_implemented"
    """A protocol this version of the stack does not forward yet."""
    NO_FLOW = "no_flow"
    """A segment or datagram that matches no flow and cannot open one."""
    OUT_OF_ORDER = "out_of_order"
    """TCP data beyond the next expected byte (a gap): dropped, answered with a duplicate ACK."""
    OUT_OF_WINDOW = "out_of_window"
    """TCP data past the window we advertised: the excess is dropped."""
    INTERNAL_ERROR = "internal_error"
    """Handling the frame raised: a bug, logged with its traceback; the link lives on."""
    LIMIT = "limit"
    """A resource bound (flows, pending connects, buffered bytes) was hit."""
    HOST_SEND_FULL = "host_send_full"
    """A datagram (UDP, ping) for the world while its host socket's send buffer was full."""
    NO_LINK = "no_link"
    """A frame for the enclave made while no link was up (counted in frames_out too)."""
    HOST_FAILED = "host_failed"
    """TCP data for a host socket that failed while the flow still delivers what it read
    before (not acknowledged: the RST that ends the flow tells the enclave)."""
    FLOW_ENDED = "flow_ended"
    """A TCP segment for the enclave whose bytes the daemon held in a pipe for a flow
    that ended before the link writer reached it (dropped before any of it was written)."""


class FrameError(ValueError):
    """A frame could not be decoded. Carries the reason it will be counted under."""

    def __init__(self, reason: DropReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

"""The netstack's link layer: ARP, ping to its own addresses, and drop accounting."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitro_netd.frames.arp import ArpOp
from nitro_netd.frames.errors import DropReason
from nitro_netd.frames.ethernet import EtherType, MacAddress, build_ethernet
from nitro_netd.frames.icmp import IcmpType
from nitro_netd.frames.ipv4 import IPv4Header
from nitro_netd.netstack import NetStack, StackConfig
from nitro_netd.netstack.events import HostEvent
from tests.support.fake_enclave import FakeEnclave

GATEWAY = IPv4Address("192.168.127.1")
HOST_ALIAS = IPv4Address("192.168.127.254")


def make() -> tuple[NetStack, FakeEnclave]:
    config = StackConfig()
    return NetStack(config), FakeEnclave(config)


def test_arp_request_for_gateway_is_answered_with_gateway_mac() -> None:
    stack, enclave = make()
    stack.receive_frame(enclave.arp_request(GATEWAY), now=1.0)
    [frame] = stack.frames_to_send()
    reply = enclave.parse_arp_reply(frame)
    assert reply.op == ArpOp.REPLY
    assert reply.sender_ip == GATEWAY
    assert reply.sender_mac == stack.config.gateway_mac
    assert reply.target_ip == enclave.ip
    assert len(frame) >= 60


def test_arp_request_for_host_alias_is_answered() -> None:
    stack, enclave = make()
    stack.receive_frame(enclave.arp_request(HOST_ALIAS), now=1.0)
    [frame] = stack.frames_to_send()
    assert enclave.parse_arp_reply(frame).sender_ip == HOST_ALIAS


def test_arp_for_other_address_is_dropped_and_counted() -> None:
    stack, enclave = make()
    stack.receive_frame(enclave.arp_request(IPv4Address("192.168.127.77")), now=1.0)
    assert stack.frames_to_send() == []
    assert stack.stats.drops[DropReason.NOT_FOR_US] == 1


def test_arp_teaches_the_enclave_mac_used_for_replies() -> None:
    stack, enclave = make()
    enclave.config = StackConfig(enclave_mac=MacAddress.parse("02:00:00:00:00:09"))
    stack.receive_frame(enclave.arp_request(GATEWAY), now=1.0)
    stack.frames_to_send()
    stack.receive_frame(enclave.ping(GATEWAY), now=1.0)
    [frame] = stack.frames_to_send()
    assert frame[:6] == MacAddress.parse("02:00:00:00:00:09").octets


def test_ping_to_gateway_gets_echo_reply_with_same_id_seq_and_data() -> None:
    stack, enclave = make()
    stack.receive_frame(enclave.ping(GATEWAY, identifier=99, sequence=5, data=b"x" * 56), now=1.0)
    [frame] = stack.frames_to_send()
    source, message = enclave.parse_icmp_reply(frame)
    assert source == GATEWAY
    assert (message.type, message.identifier, message.sequence) == (IcmpType.ECHO_REPLY, 99, 5)
    assert message.payload == b"x" * 56


def test_unhandled_ip_protocol_is_counted_as_unsupported() -> None:
    stack, enclave = make()
    stack.receive_frame(enclave.ipv4(IPv4Address("198.18.0.2"), 132, bytes(12)), now=1.0)
    assert stack.stats.drops[DropReason.UNSUPPORTED_PROTOCOL] == 1


def test_ipv6_frames_are_dropped_as_unsupported_ethertype() -> None:
    stack, enclave = make()
    frame = build_ethernet(stack.config.gateway_mac, enclave.mac, EtherType.IPV6, bytes(60))
    stack.receive_frame(frame, now=1.0)
    assert stack.stats.drops == {DropReason.UNSUPPORTED_ETHERTYPE: 1}


def test_frame_to_another_mac_is_not_for_us() -> None:
    stack, enclave = make()
    frame = enclave.ping(GATEWAY)
    frame = bytes(6) + frame[6:]
    stack.receive_frame(frame, now=1.0)
    assert stack.stats.drops == {DropReason.NOT_FOR_US: 1}


def test_spoofed_source_address_is_dropped() -> None:
    stack, _ = make()
    spoofer = FakeEnclave(StackConfig(enclave_ip=IPv4Address("192.168.127.9")))
    stack.receive_frame(spoofer.ping(GATEWAY), now=1.0)
    assert stack.stats.drops == {DropReason.BAD_SOURCE: 1}


def test_corrupted_ip_header_is_dropped_with_bad_checksum() -> None:
    stack, enclave = make()
    frame = bytearray(enclave.ping(GATEWAY))
    frame[14 + 8] ^= 0xFF  # TTL
    stack.receive_frame(frame, now=1.0)
    assert stack.stats.drops == {DropReason.BAD_CHECKSUM: 1}


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_frames_never_raise_and_are_all_accounted(data: bytes) -> None:
    stack, _ = make()
    stack.receive_frame(data, now=1.0)
    replies = stack.frames_to_send()
    assert stack.stats.frames_in == 1
    assert len(replies) + sum(stack.stats.drops.values()) >= 1


@settings(max_examples=300)
@given(st.binary(max_size=120), st.sampled_from([EtherType.ARP, EtherType.IPV4]))
def test_arbitrary_payloads_to_gateway_never_raise(payload: bytes, ethertype: EtherType) -> None:
    stack, enclave = make()
    frame = build_ethernet(stack.config.gateway_mac, enclave.mac, ethertype, payload)
    stack.receive_frame(frame, now=1.0)
    stack.frames_to_send()
    assert stack.stats.frames_in == 1


@dataclass
class Probe:
    """A host event only `RecordingLayer` takes."""

    deadline: float | None


class RecordingLayer:
    """A layer that records which of its batch and timer methods the stack calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.deadline: float | None = None

    def receive(self, header: IPv4Header, body: memoryview, now: float) -> None:
        self.calls.append("receive")

    def handle_event(self, event: HostEvent, now: float) -> None:
        assert isinstance(event, Probe)
        self.calls.append("handle_event")
        self.deadline = event.deadline

    def handle_timer(self, now: float) -> None:
        self.calls.append("handle_timer")
        self.deadline = None

    def get_timer(self) -> float | None:
        self.calls.append("get_timer")
        return self.deadline

    def before_flush(self) -> None:
        self.calls.append("before_flush")

    def reset(self) -> None:
        self.calls.append("reset")


def test_only_layers_with_input_end_the_batch_and_are_asked_their_timer() -> None:
    """Each batch asks only the layers that had input since the last one; the others'
    timers are remembered, so the stack's timer stays right."""
    stack, enclave = make()
    layer = RecordingLayer()
    stack.add_layer(253, layer, (Probe,))
    stack.drain()
    assert stack.get_timer() is None
    layer.calls.clear()

    stack.receive_frame(enclave.ping(GATEWAY, 1, 1, b"x"), now=1.0)  # ICMP: another layer
    stack.drain()
    assert stack.get_timer() is None
    assert layer.calls == [], "a layer without input was asked"

    stack.handle_host_event(Probe(deadline=5.0), now=1.0)  # type: ignore[arg-type]
    stack.drain()
    assert stack.get_timer() == 5.0
    assert layer.calls == ["handle_event", "before_flush", "get_timer"]
    layer.calls.clear()

    stack.receive_frame(enclave.ipv4(GATEWAY, 253, b"hello"), now=2.0)
    assert stack.get_timer() == 5.0
    stack.drain()
    assert layer.calls == ["receive", "get_timer", "before_flush"]
    layer.calls.clear()
    assert stack.get_timer() == 5.0, "the timer is asked again after the batch ended"
    assert layer.calls == ["get_timer"]

    stack.handle_timer(now=4.0)
    assert "handle_timer" not in layer.calls
    stack.handle_timer(now=5.0)
    assert "handle_timer" in layer.calls
    stack.drain()
    assert stack.get_timer() is None


class OtherProbe(Probe):
    """A host event for a second `RecordingLayer`."""


class FailingLayer(RecordingLayer):
    """A layer with a bug at the end of a batch."""

    def before_flush(self) -> None:
        super().before_flush()
        raise RuntimeError("a layer bug")


def test_a_layer_failing_to_end_its_batch_does_not_keep_the_others_from_ending_theirs() -> None:
    """A layer's deferred output may be views of the link's buffer, valid only during the
    batch: another layer's bug must not leave it behind."""
    stack, _ = make()
    failing, other = FailingLayer(), RecordingLayer()
    stack.add_layer(252, failing, (Probe,))
    stack.add_layer(253, other, (OtherProbe,))
    with pytest.raises(RuntimeError, match="a layer bug"):
        stack.drain()  # the batch that added them
    failing.calls.clear()
    other.calls.clear()
    stack.handle_host_event(Probe(deadline=None), now=1.0)  # type: ignore[arg-type]
    stack.handle_host_event(OtherProbe(deadline=None), now=1.0)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="a layer bug"):
        stack.drain()
    assert failing.calls == ["handle_event", "before_flush"]
    assert other.calls == ["handle_event", "before_flush"], "a failing layer kept another's"
    assert stack.get_timer() is None


def test_a_replaced_layer_is_never_asked_again() -> None:
    stack, _ = make()
    first, second = RecordingLayer(), RecordingLayer()
    stack.add_layer(253, first, (Probe,))
    stack.add_layer(253, second, (Probe,))
    stack.handle_host_event(Probe(deadline=3.0), now=1.0)  # type: ignore[arg-type]
    stack.drain()
    assert stack.get_timer() == 3.0
    stack.handle_timer(now=3.0)
    assert first.calls == []
    assert second.calls == ["handle_event", "before_flush", "get_timer", "handle_timer"]


@pytest.mark.parametrize("name", ["connect_timeout", "dns_timeout", "udp_idle_timeout"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan"), 1e9])
def test_timeouts_that_no_timer_can_take_are_refused(name: str, value: float) -> None:
    changes: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=name):
        dataclasses.replace(StackConfig(), **changes)

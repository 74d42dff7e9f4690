"""A hand-driven enclave TCP endpoint and an in-memory host, for sans-IO TCP tests.

`TcpPeer` plays the enclave's kernel for one connection: it builds segments with the
project's codecs and parses the stack's replies. `FakeHost` records the commands the stack
emits. Time is a number the test passes in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address

from nitro_netd.frames.ethernet import EtherType, build_ethernet, parse_ethernet
from nitro_netd.frames.ipv4 import IpProto, build_ipv4_header, parse_ipv4
from nitro_netd.frames.tcp import TcpFlags, TcpHeader, TcpOptions, build_tcp, parse_tcp
from nitro_netd.netstack import HostCommand, NetStack, TcpConnect
from nitro_netd.netstack.spans import HostSlice
from nitro_netd.netstack.tcp.seq import seq_add

Segment = tuple[TcpHeader, bytes]


@dataclass
class TcpPeer:
    """The enclave side of one TCP connection through `stack`."""

    stack: NetStack
    remote: IPv4Address = IPv4Address("198.18.0.2")
    remote_port: int = 80
    port: int = 40000
    isn: int = 1000
    mss: int = 1460
    window_scale: int | None = 7
    window: int = 65535
    snd_nxt: int = 0
    rcv_nxt: int = 0
    received: bytearray = field(default_factory=bytearray)
    other: list[bytes] = field(default_factory=list)
    fin_received: bool = False
    verify_checksums: bool = True
    host_stream: bytearray | None = None
    """The bytes the host gave, from the first: what the stack's `HostSlice`s refer to."""

    def frame(
        self,
        flags: TcpFlags,
        payload: bytes = b"",
        *,
        seq: int | None = None,
        ack: int | None = None,
        window: int | None = None,
        options: TcpOptions | None = None,
    ) -> bytes:
        config = self.stack.config
        segment = build_tcp(
            config.enclave_ip,
            self.remote,
            self.port,
            self.remote_port,
            self.snd_nxt if seq is None else seq,
            self.rcv_nxt if ack is None else ack,
            flags,
            self.window if window is None else window,
            options,
            payload,
        )
        ip = build_ipv4_header(config.enclave_ip, self.remote, IpProto.TCP, len(segment))
        return build_ethernet(config.gateway_mac, config.enclave_mac, EtherType.IPV4, ip + segment)

    def send(
        self, flags: TcpFlags, payload: bytes = b"", *, now: float = 1.0, **kwargs: object
    ) -> None:
        """Send one segment to the stack (advancing snd_nxt for SYN, data and FIN)."""
        # As the shell does: a view into a reused bytearray, not a bytes object.
        frame = memoryview(bytearray(self.frame(flags, payload, **kwargs)))  # type: ignore[arg-type]
        self.stack.receive_frame(frame, now=now)
        if "seq" not in kwargs:
            grow = len(payload) + (1 if flags & (TcpFlags.SYN | TcpFlags.FIN) else 0)
            self.snd_nxt = seq_add(self.snd_nxt, grow)

    def syn(self, now: float = 1.0) -> None:
        self.snd_nxt = self.isn
        options = TcpOptions(mss=self.mss, window_scale=self.window_scale, sack_permitted=True)
        self.send(TcpFlags.SYN, now=now, options=options, ack=0)

    def parse(self, frames: list[bytes | bytearray]) -> list[Segment]:
        """Decode the stack's frames for this connection; keep others in `other`."""
        out: list[Segment] = []
        for frame in frames:
            eth, payload = parse_ethernet(frame)
            if eth.ethertype != EtherType.IPV4:
                self.other.append(bytes(frame))
                continue
            ip, body = parse_ipv4(payload)
            if ip.protocol != IpProto.TCP:
                self.other.append(bytes(frame))
                continue
            tcp, data = parse_tcp(
                body,
                source=ip.source,
                destination=ip.destination,
                verify_checksum=self.verify_checksums,
            )
            assert tcp.destination_port == self.port
            out.append((tcp, bytes(data)))
        return out

    def receive(self) -> list[Segment]:
        """Drain the stack's frames for us."""
        return self.parse(self.stack.frames_to_send(self.resolve))

    def resolve(self, piece: HostSlice) -> bytes:
        """The bytes of a payload the (test) shell holds, checked against its positions."""
        assert self.host_stream is not None, "a HostSlice, but the test gave no spans"
        assert piece.released <= piece.position
        assert piece.position + piece.length <= len(self.host_stream)
        return bytes(self.host_stream[piece.position : piece.position + piece.length])

    def accept(self, segments: list[Segment]) -> None:
        """Take in-order data (and FIN) into `received`, like a receiving kernel."""
        for header, data in segments:
            if header.flags & TcpFlags.SYN:
                self.rcv_nxt = seq_add(header.seq, 1)
                continue
            if header.seq == self.rcv_nxt:
                self.received += data
                self.fin_received = self.fin_received or bool(header.flags & TcpFlags.FIN)
                self.rcv_nxt = seq_add(
                    self.rcv_nxt, len(data) + (1 if header.flags & TcpFlags.FIN else 0)
                )

    def establish(self, host: FakeHost, now: float = 1.0) -> int:
        """SYN, host connected, SYN-ACK, ACK: return the flow id."""
        from nitro_netd.netstack import TcpConnected

        self.syn(now)
        [connect] = [c for c in host.take(self.stack) if isinstance(c, TcpConnect)]
        self.stack.handle_host_event(TcpConnected(connect.flow), now=now)
        [(synack, _)] = self.receive()
        assert synack.flags == TcpFlags.SYN | TcpFlags.ACK
        self.rcv_nxt = seq_add(synack.seq, 1)
        self.send(TcpFlags.ACK, now=now)
        assert self.receive() == []
        return connect.flow


@dataclass
class FakeHost:
    """Records the stack's commands."""

    log: list[HostCommand] = field(default_factory=list)

    def take(self, stack: NetStack) -> list[HostCommand]:
        commands = stack.commands_to_send()
        self.log.extend(commands)
        return commands

    def take_connects(self, stack: NetStack) -> list[TcpConnect]:
        """The commands drained now, which must all be connects."""
        commands = self.take(stack)
        connects = [c for c in commands if isinstance(c, TcpConnect)]
        assert connects == commands, commands
        return connects

"""Counters the netstack keeps: frames and bytes each way, every drop by reason, and the
TCP translator's recovery events (how often the link to the enclave lost something)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from nitro_netd.frames.errors import DropReason

TCP_RECOVERY: Final = ("fast_retransmits", "timeouts", "window_probes", "given_up")
"""What the TCP translator counts: fast retransmits after three duplicate ACKs,
retransmission timeouts, zero-window probes, and flows reset because the enclave stopped
answering."""


def _zero_recovery() -> Counter[str]:
    return Counter(dict.fromkeys(TCP_RECOVERY, 0))


@dataclass(slots=True)
class StackStats:
    """Monotonic counters; read them, never reset them (take deltas instead)."""

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    drops: Counter[DropReason] = field(default_factory=Counter)
    tcp: Counter[str] = field(default_factory=_zero_recovery)
    """TCP recovery events by name (`TCP_RECOVERY`), every one present from the start."""

    def count_drop(self, reason: DropReason) -> None:
        """Record one dropped frame."""
        self.drops[reason] += 1

    def snapshot(self) -> dict[str, object]:
        """Return the counters as plain data (for logs, status and tests)."""
        return {
            "frames_in": self.frames_in,
            "bytes_in": self.bytes_in,
            "frames_out": self.frames_out,
            "bytes_out": self.bytes_out,
            "drops": {
                reason.value: n
                for reason, n in sorted(self.drops.items(), key=lambda i: i[0].value)
            },
            "tcp": dict(self.tcp),
        }

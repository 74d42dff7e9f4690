"""Counters the netstack keeps: frames and bytes each way, and every drop by reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from nitro_netd.frames.errors import DropReason


@dataclass(slots=True)
class StackStats:
    """Monotonic counters; read them, never reset them (take deltas instead)."""

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    drops: Counter[DropReason] = field(default_factory=Counter)

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
        }

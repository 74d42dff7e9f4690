"""Capped exponential backoff between link attempts (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays of `initial`, doubling up to `cap`; `reset()` after a good session."""

    initial: float = 0.05
    """The first delay, in seconds."""
    cap: float = 2.0
    """The longest delay, in seconds."""
    factor: float = 2.0
    """Growth from one delay to the next."""
    _next: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap or self.factor < 1:
            raise ValueError("backoff needs 0 < initial <= cap and factor >= 1")
        self._next = self.initial

    def next_delay(self) -> float:
        """Return the delay before the next attempt and grow the one after."""
        delay = self._next
        self._next = min(self.cap, delay * self.factor)
        return delay

    def reset(self) -> None:
        """Start again from `initial` (after a session that stayed up)."""
        self._next = self.initial

"""Sliding-window rate limits (requests and tokens per minute) and the circuit breaker.

A window keeps (time, amount) entries for the last 60 s, so a limit of N per minute admits
exactly N in any 60 s span: no burst at a fixed-window boundary. Token reservations are an
estimate made before the call and corrected with the real usage after it.
"""

from __future__ import annotations

import time
from collections import deque

__all__ = ["Breaker", "Window"]

WINDOW = 60.0


class Window:
    """At most `limit` units in any `WINDOW` seconds."""

    __slots__ = ("_entries", "_used", "limit", "name")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._entries: deque[list[float]] = deque()
        self._used = 0.0

    def _expire(self, now: float) -> None:
        # `now - t >= WINDOW`, the same arithmetic as wait_time's, so a wait it reports as
        # positive never rounds to an entry that already expired (or the reverse).
        while self._entries and now - self._entries[0][0] >= WINDOW:
            self._used -= self._entries.popleft()[1]

    def wait_time(self, amount: float, now: float | None = None) -> float:
        """Seconds until `amount` fits (0 when it fits now)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        if self._used + amount <= self.limit:
            return 0.0
        excess = self._used + amount - self.limit
        freed = 0.0
        for t, a in self._entries:
            freed += a
            if freed >= excess:
                return WINDOW - (now - t)
        return WINDOW

    def take(self, amount: float, now: float | None = None) -> list[float]:
        """Consumes `amount` (call after `wait_time` returned 0); returns a handle for `adjust`."""
        entry = [time.monotonic() if now is None else now, amount]
        self._entries.append(entry)
        self._used += amount
        return entry

    def adjust(self, entry: list[float], amount: float) -> None:
        """Replaces a reservation's estimate with the real amount."""
        self._used += amount - entry[1]
        entry[1] = amount


class Breaker:
    """Opens after `failures` consecutive failures; after `cooldown` s lets one trial through."""

    __slots__ = ("_consecutive", "_open_until", "cooldown", "failures")

    def __init__(self, failures: int, cooldown: float) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._consecutive = 0
        self._open_until = 0.0

    def allows(self) -> bool:
        now = time.monotonic()
        if self._consecutive < self.failures:
            return True
        if now >= self._open_until:
            # Half-open: one trial; a failure re-opens for another cooldown.
            self._open_until = now + self.cooldown
            return True
        return False

    @property
    def is_open(self) -> bool:
        return self._consecutive >= self.failures and time.monotonic() < self._open_until

    def success(self) -> None:
        self._consecutive = 0

    def failure(self) -> None:
        self._consecutive += 1
        if self._consecutive == self.failures:
            self._open_until = time.monotonic() + self.cooldown

"""What admission asks of shared state, and the in-process answer (one replica, or Redis down).

A reservation is a list of period counters (budgets) and token buckets (rate limits), checked and
applied all at once: either every hard one has room and all are charged, or nothing is charged.
Settling adds the difference between what was reserved and what was used. The Redis ledger
(redis_ledger.py) runs the same rules in Lua, so both answer alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

# A budget counter lives a day past its period: a request that straddles the boundary settles
# into the key it reserved on.
COUNTER_GRACE_S = 86_400


@dataclass(slots=True)
class Counter:
    """A period budget: `amount` is added; refused when hard and it would pass `limit`."""

    key: str
    limit: int
    amount: int
    hard: bool
    expires_at: int  # Unix seconds


@dataclass(slots=True)
class Bucket:
    """A token bucket of `capacity` per minute, refilled continuously."""

    key: str
    capacity: int
    amount: int


@dataclass(slots=True)
class Outcome:
    ok: bool
    # refused: index into counters + buckets of the first that had no room
    refused: int = -1
    retry_after_s: float = 0.0
    # counters' values after the charge (or as found, when refused)
    totals: list[int] = field(default_factory=list)
    # buckets' remaining after the charge (or as found)
    remaining: list[float] = field(default_factory=list)


def refill(tokens: float, last: float, now: float, capacity: int) -> float:
    return min(float(capacity), tokens + max(0.0, now - last) * capacity / 60.0)


class LocalLedger:
    """In-memory state of one process. With N replicas each has its own: a budget is then
    enforced per replica (up to N times the limit overall)."""

    is_async: Literal[False] = False

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.counters: dict[str, tuple[int, int]] = {}  # key -> (value, expires_at)
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self.alerts: set[str] = set()

    def value(self, key: str) -> int:
        entry = self.counters.get(key)
        return entry[0] if entry is not None else 0

    def reserve(self, counters: list[Counter], buckets: list[Bucket]) -> Outcome:
        now = self._clock()
        self._expire(now)
        found = [self.value(c.key) for c in counters]
        for i, c in enumerate(counters):
            if c.hard and found[i] + c.amount > c.limit:
                return Outcome(False, i, max(1.0, c.expires_at - COUNTER_GRACE_S - now), found)
        levels: list[float] = []
        for j, b in enumerate(buckets):
            tokens, at = self.buckets.get(b.key, (float(b.capacity), now))
            level = refill(tokens, at, now, b.capacity)
            if level < b.amount:
                wait = (b.amount - level) * 60.0 / b.capacity if b.capacity else 60.0
                return Outcome(False, len(counters) + j, wait, found, [level])
            levels.append(level)
        totals = []
        for c, v in zip(counters, found, strict=True):
            self.counters[c.key] = (v + c.amount, c.expires_at)
            totals.append(v + c.amount)
        remaining = []
        for b, level in zip(buckets, levels, strict=True):
            self.buckets[b.key] = (level - b.amount, now)
            remaining.append(level - b.amount)
        return Outcome(True, totals=totals, remaining=remaining)

    def adjust(self, counters: list[Counter], buckets: list[Bucket]) -> list[int]:
        """Add each amount (negative: release) unconditionally; returns the counters' values."""
        now = self._clock()
        totals = []
        for c in counters:
            v = self.value(c.key) + c.amount
            self.counters[c.key] = (v, c.expires_at)
            totals.append(v)
        for b in buckets:
            tokens, at = self.buckets.get(b.key, (float(b.capacity), now))
            self.buckets[b.key] = (min(float(b.capacity), refill(tokens, at, now, b.capacity) - b.amount), now)
        return totals

    def claim_alert(self, key: str, expires_at: int) -> bool:
        """True exactly once per key: a soft budget's threshold fires once per period."""
        if key in self.alerts:
            return False
        self.alerts.add(key)
        return True

    def seed(self, key: str, value: int, expires_at: int) -> None:
        """Spend so far from storage after a restart; never lowers what is already counted."""
        if value > self.value(key):
            self.counters[key] = (value, expires_at)

    def _expire(self, now: float) -> None:
        if len(self.counters) > 10_000:
            for k in [k for k, (_, exp) in self.counters.items() if exp < now]:
                del self.counters[k]

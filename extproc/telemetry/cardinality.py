"""Cardinality guard: bounds the distinct values each metric attribute can take.

Label values come from clients (x-feature, the request's model name, ...). Every distinct value
is a new time series in Prometheus and in the SDK's memory, so past `max_values` distinct values
per key, new values are reported as "other". First come, first kept, until restart: that keeps
the memory bound trivial (at most max_values strings per key) and the series stable. Events in
ClickHouse keep the full value; only metrics are folded.
"""

from __future__ import annotations

from collections import Counter

from extproc.telemetry.names import OTHER

# Longer values are cut: they are never legitimate label values and would bloat every series.
MAX_VALUE_LENGTH = 256


class LabelGuard:
    def __init__(self, max_values: int, *, other: str = OTHER) -> None:
        self._max = max(0, max_values)
        self._other = other
        self._seen: dict[str, set[str]] = {}
        # values reported as `other`, by key (exported as extproc.metrics.labels.folded)
        self.folded: Counter[str] = Counter()

    def value(self, key: str, value: str) -> str:
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = set()
        if len(value) > MAX_VALUE_LENGTH:
            value = value[:MAX_VALUE_LENGTH]
        if value in seen:
            return value
        if len(seen) < self._max:
            seen.add(value)
            return value
        self.folded[key] += 1
        return self._other

    def distinct(self, key: str) -> int:
        """Number of distinct values kept for `key` (excluding `other`)."""
        return len(self._seen.get(key, ()))

"""Errors counted in SidecarStats.errors and logged at most once per kind every 10 s: these
happen per event or per connection, and a flood of identical lines hides everything else."""

from __future__ import annotations

import logging
import time

from extproc.stats import SidecarStats

LOG_EVERY_S = 10.0


class CountedErrors:
    def __init__(self, stats: SidecarStats, logger: logging.Logger) -> None:
        self.stats = stats
        self._log = logger
        self._logged: dict[str, float] = {}

    def __call__(self, kind: str, message: str) -> None:
        self.stats.errors[kind] += 1
        now = time.monotonic()
        if now - self._logged.get(kind, -1e9) >= LOG_EVERY_S:
            self._logged[kind] = now
            self._log.error("%s (%d so far)", message, self.stats.errors[kind])

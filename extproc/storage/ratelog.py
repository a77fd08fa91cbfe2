"""Rate-limited logging for paths that run per event or per retry."""

from __future__ import annotations

import logging
import time
from typing import Any


class LogLimiter:
    """At most one line per key every `every` seconds."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self._log = logger
        self._every = every
        self._times: dict[str, float] = {}

    def __call__(self, key: str, level: int, msg: str, *args: Any, exc: bool = False) -> None:
        now = time.monotonic()
        if now - self._times.get(key, -1e9) >= self._every:
            self._times[key] = now
            self._log.log(level, msg, *args, exc_info=exc)

"""The one thing the connection core needs from an event loop: a timer (grpc-timeout)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Schedule(Protocol):
    """`callback` runs once after `delay` seconds unless the returned timer is cancelled.
    asyncio's glue passes a wrapper of loop.call_later that also flushes the connection."""

    def __call__(self, delay: float, callback: Callable[[], None]) -> Timer: ...

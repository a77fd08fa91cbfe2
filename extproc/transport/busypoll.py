"""An epoll selector that polls without blocking for a moment after each activity.

In synchronous mode Envoy sends a request's next ext_proc message a few hundred microseconds
after our answer. Blocking in epoll_wait in between puts the process to sleep, and waking it
again (an idle vCPU, a scheduler decision) costs more than the work itself at low load. Polling
for `window` seconds after the last ready event catches that next message awake; with no
traffic the loop blocks as usual, so an idle sidecar burns nothing.
"""

from __future__ import annotations

import asyncio
import selectors
import time


class BusyPollSelector(selectors.EpollSelector):
    def __init__(self, window: float) -> None:
        super().__init__()
        self.window = window
        self._last_ready = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout > 0:
            start = time.monotonic()
            until = self._last_ready + self.window
            if start < until:
                if timeout is not None:
                    until = min(until, start + timeout)
                poll = super().select
                while True:
                    ready = poll(0)
                    if ready:
                        self._last_ready = time.monotonic()
                        return ready
                    now = time.monotonic()
                    if now >= until:
                        break
                if timeout is not None:
                    timeout = max(0.0, timeout - (now - start))
        ready = super().select(timeout)
        if ready:
            self._last_ready = time.monotonic()
        return ready


def new_event_loop(window: float) -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(BusyPollSelector(window))

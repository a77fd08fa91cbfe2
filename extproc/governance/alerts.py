"""Soft-budget webhooks, posted from a background task: the request path only enqueues."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


class WebhookSender:
    def __init__(self, default_url: str = "", timeout_s: float = 5.0, max_queue: int = 1000) -> None:
        self.default_url = default_url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.errors = 0

    def __call__(self, alert: dict[str, Any]) -> None:
        if not (alert.get("webhook") or self.default_url):
            return
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.errors += 1
            log.error("budget webhook queue full: alert for %s at %s%% not sent", alert["scope"],
                      alert["threshold_pct"])

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="extproc-budget-webhooks")

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            while True:
                alert = await self._queue.get()
                url = alert.pop("webhook", "") or self.default_url
                try:
                    async with session.post(url, json=alert) as resp:
                        if resp.status >= 300:
                            raise RuntimeError(f"HTTP {resp.status}")
                    self.sent += 1
                except Exception as exc:
                    self.errors += 1
                    log.error("budget webhook %s failed for %s at %s%%: %s", url, alert["scope"],
                              alert["threshold_pct"], exc)
                finally:
                    self._queue.task_done()

    async def stop(self, timeout: float = 5.0) -> None:
        if self._task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

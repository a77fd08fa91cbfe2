"""Recount with vLLM's own /tokenize, off the hot path, an event whose tokens could only be
estimated (no usage from upstream, no chat template or tokenizer of the served model here).

The event waits for the answers, or for `timeout_s`, then goes to the sinks either way: with
vLLM's counts (token_source tokenizer, tokenizer "vllm:/tokenize"), or unchanged (still
tokenizer_estimate) when vLLM could not answer. It is never lost: stopping waits for what is in
flight, and past `max_in_flight` events go on unchanged at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from extproc.events import TokenSource, UsageEvent
from extproc.processors.base import RecountRequest
from extproc.stats import SidecarStats

log = logging.getLogger(__name__)

TOKENIZER_NAME = "vllm:/tokenize"


class Recounter:
    def __init__(self, base_url: str, emit: Callable[[UsageEvent], None], stats: SidecarStats, *,
                 timeout_s: float = 0.5, max_in_flight: int = 256) -> None:
        self._url = base_url.rstrip("/") + "/tokenize"
        self._emit = emit
        self._timeout = timeout_s
        self._max = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.stats = stats

    def submit(self, event: UsageEvent, request: RecountRequest) -> None:
        """Take the event; it reaches `emit` later, recounted or not."""
        if len(self._tasks) >= self._max:
            self.stats.tokenize_overflow += 1
            self._emit(event)
            return
        task = asyncio.get_running_loop().create_task(self._recount(event, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def _recount(self, event: UsageEvent, request: RecountRequest) -> None:
        try:
            prompt, output, reasoning = await asyncio.wait_for(self._ask(request), self._timeout)
        except Exception as exc:  # timeout, connection refused, an error answer: keep the estimate
            self.stats.tokenize_failed += 1
            log.warning("request %s: vLLM /tokenize gave no count (%s); the estimate stays",
                        event.request_id, exc.__class__.__name__ if isinstance(exc, TimeoutError) else exc)
        else:
            self.stats.tokenize_recounted += 1
            event.prompt_tokens = prompt
            event.completion_tokens = output + reasoning
            event.reasoning_tokens = reasoning
            event.total_tokens = event.prompt_tokens + event.completion_tokens
            event.token_source = TokenSource.TOKENIZER
            event.tokenizer = TOKENIZER_NAME
        self._emit(event)

    async def _ask(self, request: RecountRequest) -> tuple[int, int, int]:
        if self._session is None:
            self._session = aiohttp.ClientSession(json_serialize=lambda o: orjson.dumps(o).decode())
        counts = await asyncio.gather(*(self._count(b) for b in (*request.prompt, *request.output, *request.reasoning)))
        p, o = len(request.prompt), len(request.output)
        return sum(counts[:p]), sum(counts[p:p + o]), sum(counts[p + o:])

    async def _count(self, body: dict[str, Any]) -> int:
        assert self._session is not None
        async with self._session.post(self._url, json=body) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"/tokenize answered HTTP {resp.status}: {data[:200]!r}")
        answer = orjson.loads(data)
        count = answer.get("count") if isinstance(answer, dict) else None
        if not isinstance(count, int) or count < 0:
            raise RuntimeError(f"/tokenize answer has no count: {data[:200]!r}")
        return count

    async def close(self) -> None:
        """Let what is in flight finish (each is bounded by the timeout), then close."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

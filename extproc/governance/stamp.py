"""The pricing stage: writes list cost, price status and GPU work onto each finished UsageEvent.

It is the first of the main process's sinks, so the spool, ClickHouse and the metrics all see
the same figures (events relayed by worker processes pass through it too). The price book can
be swapped while serving (`extproc reprice`): an event is priced by the book current when it
finishes.
"""

from __future__ import annotations

import logging

from extproc.events import UsageEvent
from extproc.governance.pricing import PriceBook, cost_micros

log = logging.getLogger(__name__)

PRICED, UNPRICED, UNMETERED = "priced", "unpriced", "unmetered"


def stamp(book: PriceBook | None, ev: UsageEvent) -> None:
    if not ev.metered:
        ev.price_status = UNMETERED
        return
    if book is None:
        ev.price_status = UNPRICED
        return
    at = ev.start_time_unix_nano
    entry = book.entry(ev.response_model or ev.request_model)
    if entry is None:
        ev.price_status = UNPRICED
        return
    prompt, cached, completion = ev.prompt_tokens, ev.cached_tokens, ev.completion_tokens
    price = entry.price_at(at)
    if price is None:
        ev.price_status = UNPRICED
    else:
        ev.list_cost_micros = cost_micros(
            price, prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion,
            reasoning_tokens=ev.reasoning_tokens, request_fee=ev.http_status < 400 and not ev.error)
        ev.price_status = PRICED
        ev.price_ref = price.ref
    pool = book.pools.get(entry.pool) if entry.pool else None
    if pool is not None:
        ev.gpu_pool = pool.name
        ev.gpu_work_milli = pool.work_milli(at, prompt_tokens=prompt, cached_tokens=cached,
                                            completion_tokens=completion)


class PricingStage:
    """An EventSink that only annotates: it must run before the sinks that store or count."""

    def __init__(self, book: PriceBook | None) -> None:
        self.book = book
        self.errors = 0

    def emit(self, event: UsageEvent) -> None:
        try:
            stamp(self.book, event)
        except Exception as exc:  # a pricing bug must not lose the event: store it unpriced, say why
            self.errors += 1
            event.list_cost_micros = 0
            event.price_status = UNPRICED
            if not event.error:
                event.error, event.error_detail = "internal_error", f"pricing: {exc!r}"[:500]
            log.exception("pricing event %s", event.event_id)

    def cost_usd(self, event: UsageEvent) -> float | None:
        """For the extproc.cost.usd counter (exact sums live in ClickHouse)."""
        return event.list_cost_micros / 1e6 if event.price_status == PRICED else None

    async def start(self) -> None: ...

    async def force_flush(self, timeout: float = 30.0) -> bool:
        return True

    async def shutdown(self, timeout: float = 30.0) -> None: ...

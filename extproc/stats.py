"""Plain counters bumped on the hot path; telemetry reads them through observable callbacks.

Integers on one event loop: no locks, no allocations per increment.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SidecarStats:
    streams_opened: int = 0
    streams_closed: int = 0
    # streams that ended without the response end-of-stream (client abort, Envoy reset)
    streams_cancelled: int = 0
    # ext_proc messages received, by kind (request_headers, response_body, ...)
    messages: Counter[str] = field(default_factory=Counter)
    # errors while handling a message, by kind; the stream is answered regardless
    errors: Counter[str] = field(default_factory=Counter)
    # requests on paths we do not meter (passed through, counted)
    unmetered_requests: int = 0
    # events handed to sinks
    events_emitted: int = 0
    # Output deltas seen while responses stream (~1 token each in vLLM): a live, approximate
    # tokens/s for dashboards; exact counts arrive with each finished event.
    live_output_tokens: int = 0
    # label values rejected or rewritten by validation, by label name
    labels_rejected: Counter[str] = field(default_factory=Counter)

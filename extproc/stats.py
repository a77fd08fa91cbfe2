"""Plain counters bumped on the hot path; telemetry reads them through observable callbacks.

Integers on one event loop: no locks, no allocations per increment.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


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
    # POSTs to paths we cannot meter that were refused (metering.unknown_post: refuse)
    refused_requests: int = 0
    # events handed to sinks
    events_emitted: int = 0
    # Output deltas seen while responses stream (~1 token each in vLLM): a live, approximate
    # tokens/s for dashboards; exact counts arrive with each finished event.
    live_output_tokens: int = 0
    # label values rejected or rewritten by validation, by label name
    labels_rejected: Counter[str] = field(default_factory=Counter)
    # hybrid mode: response streams paired with their request by x-request-id (the request
    # filter failed open before our correlation header was applied), and request streams not
    # counted because their response stream had already metered the request alone
    hybrid_paired_by_request_id: int = 0
    hybrid_duplicates_dropped: int = 0
    # events only estimated here, sent to vLLM's /tokenize: recounted, left with the estimate
    # (no answer in time, an error), or not sent (too many in flight)
    tokenize_recounted: int = 0
    tokenize_failed: int = 0
    tokenize_overflow: int = 0

    def snapshot(self) -> dict[str, int | dict[str, int]]:
        """Plain data (JSON-ready): what a worker process sends its parent."""
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), Counter) else v)
                for f in fields(self)}

    def add_delta(self, new: Mapping[str, Any], old: Mapping[str, Any]) -> None:
        """Add what a worker counted between two of its snapshots (old: {} for a new worker).
        Unknown names are ignored: a worker never runs other code than its parent, but a
        snapshot is input all the same."""
        for f in fields(self):
            cur, was = new.get(f.name), old.get(f.name)
            mine = getattr(self, f.name)
            if isinstance(mine, Counter):
                if isinstance(cur, dict):
                    was = was if isinstance(was, dict) else {}
                    for key, value in cur.items():
                        if isinstance(value, int) and (d := value - was.get(key, 0)):
                            mine[key] += d
            elif isinstance(cur, int):
                setattr(self, f.name, mine + cur - (was if isinstance(was, int) else 0))

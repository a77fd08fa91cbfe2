"""Sidecar self-metrics: observable instruments reading counters the hot path already keeps.

Callbacks run at collection time (a Prometheus scrape, or the OTLP reader's own thread), so the
gRPC path pays nothing. They only read: ints, and dict copies of Counters taken in one C call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from extproc.stats import SidecarStats
from extproc.telemetry import names as n

log = logging.getLogger(__name__)

Callback = Callable[[CallbackOptions], Iterable[Observation]]


def _snapshot(counter: Mapping[str, int]) -> dict[str, int]:
    # dict(Counter) copies in C under the GIL; retry covers a resize racing a foreign thread.
    for _ in range(3):
        try:
            return dict(counter)
        except RuntimeError:
            continue
    return {}


def read_number(obj: Any, attr: str) -> int | float | None:
    """Duck-typed read of an attribute, property or zero-argument method; None if absent/bad."""
    try:
        value = getattr(obj, attr, None)
        if callable(value):
            value = value()
        if value is None:
            return None
        return int(value) if isinstance(value, int) else float(value)  # ints stay ints in OTLP
    except Exception:  # a storage bug must not break collection of everything else
        log.debug("reading %s.%s failed", type(obj).__name__, attr, exc_info=True)
        return None


class SelfMetrics:
    """Registers the observable instruments; `storage` may be attached later (or never)."""

    def __init__(
        self,
        meter: Meter,
        stats: SidecarStats | None,
        folded: Mapping[str, int],
        record_errors: Callable[[], int],
        storage: object | None = None,
    ) -> None:
        self.stats = stats
        self.storage = storage
        self._folded = folded
        self._record_errors = record_errors

        def counter(name: str, unit: str, desc: str, cb: Callback) -> None:
            meter.create_observable_counter(name, [cb], unit=unit, description=desc)

        def gauge(name: str, unit: str, desc: str, cb: Callback) -> None:
            meter.create_observable_gauge(name, [cb], unit=unit, description=desc)

        if stats is not None:
            counter(n.STREAMS_OPENED, "{stream}", "ext_proc streams opened by Envoy.",
                    self._stat("streams_opened"))
            counter(n.STREAMS_CLOSED, "{stream}", "ext_proc streams finished (incl. cancelled).",
                    self._stat("streams_closed"))
            counter(n.STREAMS_CANCELLED, "{stream}",
                    "ext_proc streams cancelled before the response end (metering at risk).",
                    self._stat("streams_cancelled"))
            gauge(n.STREAMS_ACTIVE, "{stream}", "ext_proc streams currently open.",
                  self._active_streams)
            counter(n.MESSAGES, "{message}", "ext_proc messages received, by kind.",
                    self._by_key("messages", "kind"))
            counter(n.ERRORS, "{error}", "Errors handling ext_proc messages, by kind.",
                    self._by_key("errors", "kind"))
            counter(n.UNMETERED, "{request}", "Requests on paths passed through unmetered.",
                    self._stat("unmetered_requests"))
            counter(n.REFUSED, "{request}", "POSTs to paths that cannot be metered, refused "
                    "(metering.unknown_post: refuse).", self._stat("refused_requests"))
            counter(n.EVENTS_EMITTED, "{event}", "Usage events handed to the sinks.",
                    self._stat("events_emitted"))
            counter(n.LIVE_OUTPUT_TOKENS, "{token}",
                    "Output deltas seen as responses stream (~1 token each): live, approximate; "
                    "exact counts are extproc.tokens, recorded when each request ends.",
                    self._stat("live_output_tokens"))
            counter(n.LABELS_REJECTED, "{value}", "Label values rejected by validation.",
                    self._by_key("labels_rejected", "label"))
        counter(n.LABELS_FOLDED, "{value}",
                "Metric label values reported as 'other' by the cardinality guard.",
                self._folded_values)
        counter(n.RECORD_ERRORS, "{event}", "Usage events the metrics sink failed to record.",
                lambda _o: [Observation(self._record_errors())])

        for name, attr, unit, desc, make in (
            (n.QUEUE_DEPTH, "queue_depth", "{event}", "Events waiting for the batch insert.", gauge),
            (n.SPOOL_SIZE, "spool_bytes", "By", "Size of the on-disk spool.", gauge),
            (n.SPOOL_OLDEST_AGE, "spool_oldest_age_s", "s",
             "Age of the oldest spooled event (0 when empty).", gauge),
            (n.LAST_FLUSH_DURATION, "last_flush_seconds", "s",
             "Duration of the last batch flush.", gauge),
            (n.EVENTS_INSERTED, "events_inserted", "{event}", "Events inserted into storage.",
             counter),
            (n.EVENTS_SPOOLED, "events_spooled", "{event}", "Events written to the spool.",
             counter),
            (n.EVENTS_DROPPED, "events_dropped", "{event}", "Events lost. Must stay 0.", counter),
            (n.INSERT_FAILURES, "insert_failures", "{failure}", "Failed storage inserts.",
             counter),
            (n.BACKLOG, "backlog", "{event}",
             "Events emitted and not yet stored (memory queue + spool).", gauge),
            (n.EVENTS_REPLAYED, "events_replayed", "{event}",
             "Events inserted from the spool (overflow or crash recovery).", counter),
            (n.EVENTS_DEAD_LETTERED, "events_dead_lettered", "{event}",
             "Events set aside because storage rejected them.", counter),
            (n.SPOOL_ERRORS, "spool_errors", "{error}", "Spool read/write errors.", counter),
        ):
            make(name, unit, desc, self._storage_value(attr))

    def _stat(self, attr: str) -> Callback:
        def cb(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(getattr(self.stats, attr))]

        return cb

    def _by_key(self, attr: str, key: str) -> Callback:
        def cb(_options: CallbackOptions) -> Iterable[Observation]:
            items = _snapshot(getattr(self.stats, attr)).items()
            return [Observation(v, {key: k}) for k, v in items]

        return cb

    def _active_streams(self, _options: CallbackOptions) -> Iterable[Observation]:
        stats = self.stats
        assert stats is not None
        return [Observation(max(0, stats.streams_opened - stats.streams_closed))]

    def _folded_values(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, {"label": k}) for k, v in _snapshot(self._folded).items()]

    def _storage_value(self, attr: str) -> Callback:
        # No storage, or storage without that attribute: no data point (not a misleading 0).
        def cb(_options: CallbackOptions) -> Iterable[Observation]:
            if self.storage is None:
                return []
            value = read_number(self.storage, attr)
            return [] if value is None else [Observation(value)]

        return cb

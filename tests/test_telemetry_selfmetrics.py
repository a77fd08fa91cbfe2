"""Self-metrics read from SidecarStats and a duck-typed storage object at collection time."""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc.config import Settings
from extproc.stats import SidecarStats
from extproc.telemetry import UsageMetrics
from extproc.telemetry import names as n
from tests.telemetry_testing import FakeStorage, read


class BrokenStorage:
    @property
    def queue_depth(self) -> int:
        raise RuntimeError("boom")


def _metrics(stats: SidecarStats | None, storage: object | None = None):
    settings = Settings()
    settings.metrics.prometheus = False
    reader = InMemoryMetricReader()
    metrics = UsageMetrics.from_settings(settings, stats, storage=storage, extra_readers=[reader])
    return metrics, reader


def test_stats_are_exported() -> None:
    stats = SidecarStats(streams_opened=10, streams_closed=8, streams_cancelled=3,
                         unmetered_requests=4, refused_requests=7, events_emitted=6)
    stats.messages.update({"request_headers": 10, "response_body": 25})
    stats.errors["response_body"] += 2
    stats.labels_rejected["feature"] += 5
    _, reader = _metrics(stats)
    snap = read(reader)
    assert snap.value(n.STREAMS_OPENED) == 10
    assert snap.value(n.STREAMS_CLOSED) == 8
    assert snap.value(n.STREAMS_CANCELLED) == 3
    assert snap.value(n.STREAMS_ACTIVE) == 2
    assert snap.value(n.MESSAGES, {"kind": "request_headers"}) == 10
    assert snap.value(n.MESSAGES, {"kind": "response_body"}) == 25
    assert snap.value(n.ERRORS, {"kind": "response_body"}) == 2
    assert snap.value(n.UNMETERED) == 4
    assert snap.value(n.REFUSED) == 7
    assert snap.value(n.EVENTS_EMITTED) == 6
    assert snap.value(n.LABELS_REJECTED, {"label": "feature"}) == 5

    # live: the next collection sees the hot path's increments
    stats.streams_opened += 1
    stats.messages["request_body"] += 1
    snap = read(reader)
    assert snap.value(n.STREAMS_OPENED) == 11
    assert snap.value(n.MESSAGES, {"kind": "request_body"}) == 1


def test_storage_metrics() -> None:
    _, reader = _metrics(SidecarStats(), FakeStorage())
    snap = read(reader)
    assert snap.value(n.QUEUE_DEPTH) == 42
    assert snap.value(n.SPOOL_SIZE) == 4096
    assert snap.value(n.SPOOL_OLDEST_AGE) == 12.5
    assert snap.value(n.LAST_FLUSH_DURATION) == 0.125
    assert snap.value(n.EVENTS_INSERTED) == 1000
    assert snap.value(n.EVENTS_SPOOLED) == 7
    assert snap.value(n.EVENTS_DROPPED) == 0
    assert snap.value(n.INSERT_FAILURES) == 2
    assert snap.value(n.BACKLOG) == 50
    assert snap.value(n.EVENTS_REPLAYED) == 3
    assert snap.value(n.EVENTS_DEAD_LETTERED) == 1
    assert snap.value(n.SPOOL_ERRORS) == 0


def test_storage_absent_broken_or_attached_later() -> None:
    metrics, reader = _metrics(None)
    snap = read(reader)
    # no storage: no data points at all (rather than a misleading 0); no stats: none either
    assert n.QUEUE_DEPTH not in snap.names() and n.EVENTS_DROPPED not in snap.names()
    assert n.STREAMS_OPENED not in snap.names()

    metrics.attach_storage(BrokenStorage())
    snap = read(reader)  # a raising property costs its own metric only
    assert n.QUEUE_DEPTH not in snap.names()
    assert snap.value(n.RECORD_ERRORS) == 0

    storage = FakeStorage()
    metrics.attach_storage(storage)
    storage.events_dropped = 3
    assert read(reader).value(n.EVENTS_DROPPED) == 3

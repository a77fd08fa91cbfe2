"""Explicit-bucket histograms aggregated by us, exported through the SDK's own readers.

Why not SDK Histograms on the hot path: every `Histogram.record` cleans the attribute dict,
hashes it into a sorted key, asks the exemplar filter and takes locks, for each reader: ~13 us
per recording with ~10 attributes, and an event makes 3-5 recordings. Here the recorder
resolves a `Series` handle once per attribute set (UsageRecorder's slot cache), and a recording
is a bisect and a few additions: well under a microsecond.

What the readers receive is what SDK histograms would have given them:
- same buckets (`bisect_left`: upper bounds inclusive), sum, count, min and max; negative and
  non-finite values dropped; a series exists from its first recording, which is its start time;
- per reader, its own temporality and cardinality limit. Cumulative readers share one set of
  running totals, kept in first-recording order, and each keeps its first `limit` attribute
  sets and folds the rest into one `otel.metric.overflow=true` point, as the SDK does. A delta
  reader gets its own table per histogram, emptied at each of its collections: per-interval
  limit and start times (its previous collection) as in the SDK. So does a reader added after
  recording began (UsageMetrics.add_metric_reader): it sees only what is recorded from then on.
- the same Metric (name, unit, description) in the same scope ("extproc") of the same
  MetricsData, next to the SDK's own instruments, so Prometheus /metrics, OTLP and in-memory
  readers each see one coherent batch.

Export hook: `HistogramStore.attach(reader)` wraps the reader's `_receive_metrics` (the method
every MetricReader implements: InMemory, Prometheus, PeriodicExporting/OTLP), so our points are
added right after the SDK has collected for that reader. That and every other SDK internal used
here go through sdk_internals.py; an SDK without them gets SDK histograms instead.

When a configuration asks for something this does not reproduce (a View, a non-default
histogram aggregation such as OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=
base2_exponential_bucket_histogram, exemplars), `fast_path_blocker` names it and the recorder
uses real SDK histograms instead (`SdkHistogram`, same handle interface).

Threads: one writer (the event loop) records with `store.lock` held for the whole event; a
collection copies under the same lock (the OTLP reader collects on its own thread, Prometheus
on the loop), so a point never holds half of an event.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from bisect import bisect_left
from collections.abc import Sequence
from time import time_ns
from typing import Any

from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.view import DefaultAggregation
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from extproc.telemetry import sdk_internals as sdk
from extproc.telemetry.counters import DEFAULT_MAX_SERIES, OVERFLOW_KEY, AttrKey
from extproc.telemetry.sdk_internals import provider_readers

__all__ = ["FastHistogram", "HistogramStore", "SdkHistogram", "fast_path_blocker",
           "provider_readers", "reader_supported"]

log = logging.getLogger(__name__)

_INF = math.inf
_OVERFLOW_ATTRIBUTES = dict(OVERFLOW_KEY)


class _Acc:
    """Bucket counts, sum, min and max of one attribute set (for one reader or all)."""

    __slots__ = ("attributes", "counts", "max", "min", "start_ns", "sum")

    def __init__(self, key: AttrKey, buckets: int, start_ns: int) -> None:
        self.attributes = dict(key)  # shared by every exported point, as the SDK does
        self.start_ns = start_ns
        self.counts = [0] * buckets
        self.sum: int | float = 0  # stays an int for int recordings, like the SDK's
        self.min: int | float = _INF
        self.max: int | float = -_INF

    def add(self, i: int, value: int | float) -> None:
        self.counts[i] += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value


class _ReaderTable:
    """One reader's own series of one histogram, for the readers the shared cumulative totals
    cannot serve: a delta reader (emptied at each of its collections) and a reader added after
    recording began (which, as with SDK histograms, only sees what is recorded from then on)."""

    __slots__ = ("accs", "buckets", "last_ns", "limit", "reset", "used")

    def __init__(self, reader: _ReaderState, buckets: int) -> None:
        self.reset = reader.delta
        self.limit = reader.limit
        self.buckets = buckets
        self.accs: dict[AttrKey, _Acc] = {}
        # Start time of a delta series: the previous collection, once the histogram has been
        # recorded at all (before that, the SDK has no state for it and uses "now").
        self.used = False
        self.last_ns: int | None = None

    def acc(self, key: AttrKey) -> _Acc:
        accs = self.accs
        acc = accs.get(key)
        if acc is None:
            if len(accs) >= self.limit:  # the SDK's limit (per collection interval for delta)
                key = OVERFLOW_KEY
                acc = accs.get(key)
            if acc is None:
                self.used = True
                since = self.last_ns
                acc = accs[key] = _Acc(key, self.buckets, time_ns() if since is None else since)
        return acc

    def take(self, now: int) -> list[_Row]:
        """Rows for a collection at `now` (emptying a delta table). Caller holds the lock."""
        accs = self.accs
        if self.reset:
            self.accs = {}
            if self.used:
                self.last_ns = now
        return [_Row(a) for a in accs.values()]  # the limit was applied when recording


class Series:
    """What the recorder holds per attribute set: record(value) with the store's lock held."""

    __slots__ = ("_acc", "_bounds", "_key", "_tables")

    def __init__(self, acc: _Acc, key: AttrKey, bounds: tuple[float, ...],
                 tables: list[_ReaderTable]) -> None:
        self._acc = acc  # the shared cumulative totals (our overflow series past the limit)
        self._key = key
        self._bounds = bounds
        self._tables = tables  # the histogram's list: empty unless a reader needs its own

    def record(self, value: int | float) -> None:
        if not 0 <= value < _INF:  # the SDK drops negative, infinite and NaN values
            return
        i = bisect_left(self._bounds, value)
        acc = self._acc  # _Acc.add, inlined: this runs 3-5 times per request
        acc.counts[i] += 1
        acc.sum += value
        if value < acc.min:
            acc.min = value
        if value > acc.max:
            acc.max = value
        for table in self._tables:
            table.acc(self._key).add(i, value)


class FastHistogram:
    """A histogram instrument: cumulative totals per attribute set, bounded like the SDK's."""

    def __init__(
        self,
        store: HistogramStore,
        name: str,
        *,
        unit: str,
        description: str,
        boundaries: Sequence[float],
    ) -> None:
        bounds = tuple(boundaries)
        for i, bound in enumerate(bounds):
            if not math.isfinite(bound) or (i and bounds[i - 1] >= bound):
                raise ValueError(f"{name}: bucket boundaries must be finite and increasing")
        self.name = name
        self.unit = unit
        self.description = description
        self.bounds = bounds
        # cumulative totals in first-recording order, which decides who overflows (as in the SDK)
        self.accs: dict[AttrKey, _Acc] = {}
        self.tables: list[_ReaderTable] = []  # readers with their own series (see there)
        self._store = store

    def series_for(self, key: AttrKey) -> Series:
        """A handle recording into `key`'s series, created now (as at the first recording:
        call it right before recording). Caller holds the store's lock."""
        accs = self.accs
        acc = accs.get(key)
        if acc is None:
            cum_key = key
            if len(accs) >= self._store.max_series:  # the limit, then one overflow series
                cum_key = OVERFLOW_KEY
                acc = accs.get(cum_key)
            if acc is None:
                acc = accs[cum_key] = _Acc(cum_key, len(self.bounds) + 1, time_ns())
        return Series(acc, key, self.bounds, self.tables)


class _SdkSeries:
    """Fallback handle: one attribute set of a real SDK histogram (dict built once)."""

    __slots__ = ("_attributes", "_record")

    def __init__(self, record: Any, key: AttrKey) -> None:
        self._record = record
        self._attributes = dict(key)

    def record(self, value: int | float) -> None:
        self._record(value, self._attributes)


class SdkHistogram:
    """Same interface as FastHistogram over an SDK Histogram (the SDK bounds the series)."""

    def __init__(
        self, meter: Meter, name: str, *, unit: str, description: str, boundaries: Sequence[float]
    ) -> None:
        self._instrument = meter.create_histogram(
            name, unit=unit, description=description,
            explicit_bucket_boundaries_advisory=boundaries,
        )

    def series_for(self, key: AttrKey) -> _SdkSeries:
        return _SdkSeries(self._instrument.record, key)


class _ReaderState:
    __slots__ = ("delta", "limit", "own", "temporality")

    def __init__(self, temporality: AggregationTemporality, limit: int, own: bool) -> None:
        self.temporality = temporality
        self.limit = limit  # the reader's own cardinality limit for histograms
        self.delta = temporality is AggregationTemporality.DELTA
        self.own = own or self.delta  # a _ReaderTable per histogram, not the shared totals


def reader_supported(reader: MetricReader) -> bool:
    """Whether the reader wants the explicit-bucket aggregation with the advisory buckets."""
    aggregation = sdk.histogram_aggregation(reader)
    if aggregation is None or type(aggregation) is DefaultAggregation:
        return True
    return sdk.advisory_buckets_with_min_max(aggregation)


_SDK_MISSING: list[str] | None = None


def fast_path_blocker(provider: Any) -> str | None:
    """Why our own aggregation would not export what SDK histograms would, or None."""
    global _SDK_MISSING
    if _SDK_MISSING is None:
        _SDK_MISSING = sdk.missing()
    if _SDK_MISSING:
        return f"this OpenTelemetry SDK lacks {', '.join(_SDK_MISSING)}"
    readers = provider_readers(provider)
    config = sdk.provider_config(provider)
    if readers is None or config is None:
        return "not an SDK MeterProvider"
    if sdk.provider_disabled(provider):
        return "SDK disabled"
    if sdk.configured_views(config):
        return "views configured"
    if not isinstance(sdk.exemplar_filter(config), AlwaysOffExemplarFilter):
        return "exemplars enabled"
    for reader in readers:
        if not reader_supported(reader):
            return f"{type(reader).__name__} asks for another histogram aggregation"
    return None


class HistogramStore:
    """Owns our histograms and merges them into what each attached reader collects."""

    def __init__(self, scope: InstrumentationScope, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.scope = scope
        self.lock = threading.Lock()
        # Cumulative series kept per histogram before our own overflow series: at least the
        # largest limit of the attached readers (each applies its own when it collects).
        self.max_series = max(2, max_series)
        self._histograms: list[FastHistogram] = []
        self._own_tables: list[_ReaderState] = []
        self._attached: weakref.WeakSet[MetricReader] = weakref.WeakSet()

    def histogram(
        self, name: str, *, unit: str, description: str, boundaries: Sequence[float]
    ) -> FastHistogram:
        hist = FastHistogram(self, name, unit=unit, description=description,
                             boundaries=boundaries)
        with self.lock:
            hist.tables.extend(_ReaderTable(r, len(hist.bounds) + 1) for r in self._own_tables)
            self._histograms.append(hist)
        return hist

    # --- export -----------------------------------------------------------------------------
    def attach(self, reader: MetricReader) -> None:
        """Make `reader` export our histograms next to the SDK's metrics, from now on."""
        if reader in self._attached:
            return
        self._attached.add(reader)
        temporality = sdk.histogram_temporality(reader)
        limit = sdk.histogram_cardinality_limit(reader)
        limit = limit if isinstance(limit, int) and limit > 0 else DEFAULT_MAX_SERIES
        with self.lock:
            state = _ReaderState(
                AggregationTemporality.DELTA
                if temporality is AggregationTemporality.DELTA
                else AggregationTemporality.CUMULATIVE,
                limit,
                own=any(hist.accs for hist in self._histograms),  # added after recording began
            )
            if state.own:
                self._own_tables.append(state)
                for hist in self._histograms:
                    hist.tables.append(_ReaderTable(state, len(hist.bounds) + 1))
            else:
                self.max_series = max(self.max_series, limit)
        sdk.hook_collection(reader, lambda data: self._merge(data, state))

    def _merge(self, data: MetricsData | None, state: _ReaderState) -> MetricsData | None:
        try:
            if data is None or not data.resource_metrics:
                return data  # (the SDK never hands a reader None; nothing to add to anyway)
            ours = self.collect(state)
            if not ours:
                return data
            first, *rest = data.resource_metrics
            scopes = list(first.scope_metrics)
            for i, sm in enumerate(scopes):
                if sm.scope == self.scope:
                    scopes[i] = ScopeMetrics(scope=sm.scope, metrics=[*sm.metrics, *ours],
                                             schema_url=sm.schema_url)
                    break
            else:
                scopes.append(ScopeMetrics(scope=self.scope, metrics=ours,
                                           schema_url=self.scope.schema_url))
            merged = ResourceMetrics(resource=first.resource, scope_metrics=scopes,
                                     schema_url=first.schema_url)
            return MetricsData(resource_metrics=[merged, *rest])
        except Exception:  # never cost the reader the SDK's own metrics
            log.exception("exporting the usage histograms failed")
            return data

    def collect(self, state: _ReaderState) -> list[Metric]:
        """One reader's histogram metrics, as SDK histograms would have given it."""
        now = time_ns()
        metrics = []
        for hist in self._histograms:
            with self.lock:  # copy and go: the event loop may be waiting to record
                if state.own:
                    rows = hist.tables[self._own_tables.index(state)].take(now)
                else:
                    rows = [_Row(a) for a in hist.accs.values()]
            points = _points(rows, state.limit, hist.bounds, now)
            if points:
                metrics.append(Metric(
                    name=hist.name, description=hist.description, unit=hist.unit,
                    data=Histogram(data_points=points, aggregation_temporality=state.temporality),
                ))
        return metrics


class _Row:
    """A copy of an _Acc, taken under the lock."""

    __slots__ = ("attributes", "counts", "max", "min", "start_ns", "sum")

    def __init__(self, acc: _Acc) -> None:
        self.attributes = acc.attributes
        self.start_ns = acc.start_ns
        self.counts: tuple[int, ...] = tuple(acc.counts)
        self.sum = acc.sum
        self.min = acc.min
        self.max = acc.max


def _points(rows: list[_Row], limit: int, bounds: tuple[float, ...],
            now: int) -> list[HistogramDataPoint]:
    """The first `limit` attribute sets as they are, the later ones (and our own overflow
    series) folded into one otel.metric.overflow=true point where the SDK would create it."""
    kept: list[_Row] = []
    overflow: _Row | None = None
    distinct = 0
    for row in rows:
        if row.min == _INF:
            continue  # created for a value the SDK would have dropped: never existed
        if distinct < limit and row.attributes != _OVERFLOW_ATTRIBUTES:
            kept.append(row)
            distinct += 1
        elif overflow is None:
            overflow = row
            kept.append(row)
            row.attributes = dict(OVERFLOW_KEY)
        else:
            overflow.counts = tuple(a + b for a, b in zip(overflow.counts, row.counts,
                                                          strict=True))
            overflow.sum += row.sum
            overflow.min = min(overflow.min, row.min)
            overflow.max = max(overflow.max, row.max)
    return [
        HistogramDataPoint(
            attributes=r.attributes, start_time_unix_nano=r.start_ns, time_unix_nano=now,
            count=sum(r.counts), sum=r.sum, bucket_counts=r.counts, explicit_bounds=bounds,
            min=r.min, max=r.max,
        )
        for r in kept
    ]

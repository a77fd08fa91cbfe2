"""Our own histogram aggregation (histograms.py) against the SDK's: same points for every reader
(temporality, cardinality limit, overflow, start times), consistent under a concurrent
collection, and the fallback to SDK histograms when a configuration needs them."""

from __future__ import annotations

import math
import random
import sys
import threading

import pytest
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    InMemoryMetricReader,
    MetricsData,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View

from extproc.config import Settings
from extproc.events import TokenSource, UsageEvent
from extproc.telemetry import UsageMetrics, record
from extproc.telemetry import names as n
from tests.telemetry_testing import MetricsSnapshot, OtlpHttpReceiver, read

HISTOGRAMS = (n.TOKEN_USAGE, n.REQUEST_DURATION, n.TIME_TO_FIRST_TOKEN, n.TIME_PER_OUTPUT_TOKEN)
DELTA = {HistogramInstrument: AggregationTemporality.DELTA}


def random_events(seed: int, count: int) -> list[UsageEvent]:
    rnd = random.Random(seed)
    models = ["m1", "m2", "m3", "", "x" * 300]
    out = []
    for _ in range(count):
        labels = {k: rnd.choice(v) for k, v in (
            ("team", "abcde"), ("feature", [f"f{i}" for i in range(8)]), ("env", ["prod", ""]),
        ) if rnd.random() < 0.85}
        duration = rnd.choice([0, 1, 5_000_000, 2_000_000_000, rnd.randrange(1, 10**11)])
        out.append(UsageEvent(
            endpoint=rnd.choice(["chat", "chat", "completions", "embeddings", "unknown", ""]),
            http_status=rnd.choice([200, 200, 404, 429, 503, 0]),
            metered=rnd.random() < 0.9, client_aborted=rnd.random() < 0.1,
            token_source=rnd.choice([TokenSource.UPSTREAM_USAGE, TokenSource.TOKENIZER,
                                     TokenSource.NONE]),
            request_model=rnd.choice(models), response_model=rnd.choice(models),
            error=rnd.choice(["", "", "upstream_error"]), stream=rnd.random() < 0.5,
            prompt_tokens=rnd.choice([0, 1, 4, 100, rnd.randrange(10**8)]),
            completion_tokens=rnd.choice([0, 1, 2, 21, rnd.randrange(10**6)]),
            cached_tokens=rnd.randrange(100), reasoning_tokens=rnd.randrange(10),
            time_to_first_token_ns=rnd.choice([0, 3_000_000, duration, rnd.randrange(1, 10**10)]),
            duration_ns=duration, labels=labels,
        ))
    return out


def metrics_with(settings: Settings, readers: list, *, sdk_histograms: bool) -> UsageMetrics:
    # A View matching nothing changes no output, but makes UsageMetrics use SDK histograms.
    views = [View(instrument_name="no.such.instrument")] if sdk_histograms else []
    provider = MeterProvider(metric_readers=readers, exemplar_filter=AlwaysOffExemplarFilter(),
                             views=views, shutdown_on_exit=False)
    metrics = UsageMetrics(settings, provider)
    assert (metrics.histogram_fallback is not None) is sdk_histograms
    return metrics


def points(data: MetricsData | None) -> dict:
    """{(metric, temporality): {attributes: numbers}} for every metric of the batch."""
    out: dict = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                series = out.setdefault(
                    (sm.scope.name, m.name, m.unit, m.description,
                     getattr(m.data, "aggregation_temporality", None)), {})
                for p in m.data.data_points:
                    attrs = frozenset(p.attributes.items())
                    assert attrs not in series, "one point per attribute set"
                    if hasattr(p, "bucket_counts"):
                        assert p.count == sum(p.bucket_counts)
                        series[attrs] = (p.count, p.sum, tuple(p.bucket_counts),
                                         tuple(p.explicit_bounds), p.min, p.max)
                    else:
                        series[attrs] = (p.value,)
    return out


def assert_same(ours: dict, sdk: dict) -> None:
    assert ours.keys() == sdk.keys()
    for metric, series in sdk.items():
        assert ours[metric].keys() == series.keys(), metric
        for attrs, want in series.items():
            got = ours[metric][attrs]
            for a, b in zip(got, want, strict=True):
                # sums of floats: same values, maybe added in another order
                assert a == b or (isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12)), (
                    metric, dict(attrs), got, want)


@pytest.mark.parametrize(("seed", "max_series", "limit", "delta"), [
    (1, 2000, None, False),
    (2, 2000, None, True),
    (3, 12, 5, False),   # our own overflow series, and a reader limit below it
    (4, 12, 3, True),    # per-interval limit of a delta reader
    (5, 5, 40, False),   # a reader limit above max_series
])
def test_same_points_as_sdk_histograms(seed, max_series, limit, delta, monkeypatch) -> None:
    monkeypatch.setattr(record, "MAX_SLOTS", 16)  # the slot cache is dropped and refilled too
    settings = Settings()
    settings.metrics.prometheus = False
    settings.metrics.max_series = max_series
    settings.metrics.max_label_values = 4
    settings.metrics.labels_on_latency = seed % 2 == 1

    def readers() -> list[InMemoryMetricReader]:
        limits = {HistogramInstrument: limit} if limit else None
        return [InMemoryMetricReader(preferred_temporality=DELTA if delta else None,
                                     cardinality_limits=limits), InMemoryMetricReader()]

    ours, sdk = readers(), readers()
    fast = metrics_with(settings, ours, sdk_histograms=False)
    slow = metrics_with(settings, sdk, sdk_histograms=True)
    checked = 0
    for i, event in enumerate(random_events(seed, 1500)):
        fast.emit(event)
        slow.emit(event)
        if i % 400 == 399:  # a few collections in between: delta readers start over
            for a, b in zip(ours, sdk, strict=True):
                got, want = points(a.get_metrics_data()), points(b.get_metrics_data())
                assert_same(got, want)
                checked += sum(len(v) for k, v in want.items() if k[1] in HISTOGRAMS)
    assert checked > 100
    assert dict(fast.guard.folded) == dict(slow.guard.folded)


def _usage_point(reader: InMemoryMetricReader) -> dict:
    return MetricsSnapshot.from_sdk(reader.get_metrics_data()).metrics.get(n.TOKEN_USAGE, {})


def _event(prompt: int, **kw) -> UsageEvent:
    base = dict(endpoint="chat", request_model="m", response_model="m", http_status=200,
                prompt_tokens=prompt, completion_tokens=3, metered=True, duration_ns=10**8,
                token_source=TokenSource.UPSTREAM_USAGE, labels={"team": "t"})
    base.update(kw)
    return UsageEvent(**base)


def test_delta_reader_gets_intervals_with_sdk_start_times() -> None:
    settings = Settings()
    settings.metrics.prometheus = False
    delta, cumulative = InMemoryMetricReader(preferred_temporality=DELTA), InMemoryMetricReader()
    metrics = metrics_with(settings, [delta, cumulative], sdk_histograms=False)
    metrics.emit(_event(10))
    metrics.emit(_event(20))
    first = _usage_point(delta)
    (p1,) = [p for a, p in first.items() if ("gen_ai.token.type", "input") in a]
    assert (p1.count, p1.sum, p1.min, p1.max) == (2, 30, 10, 20)
    metrics.emit(_event(5))
    second = _usage_point(delta)
    (p2,) = [p for a, p in second.items() if ("gen_ai.token.type", "input") in a]
    assert (p2.count, p2.sum, p2.min, p2.max) == (1, 5, 5, 5)  # only the new interval
    assert p2.start_time_unix_nano == p1.time_unix_nano  # starts at the previous collection
    assert p1.start_time_unix_nano < p1.time_unix_nano
    third = _usage_point(delta)
    assert third == {}  # nothing recorded since: no point, as the SDK does
    # the cumulative reader is not affected by the delta reader's collections
    total = _usage_point(cumulative)
    (c,) = [p for a, p in total.items() if ("gen_ai.token.type", "input") in a]
    assert (c.count, c.sum, c.min, c.max) == (3, 35, 5, 20)
    # both start at the first recording (the SDK too reads the clock once per reader)
    assert abs(c.start_time_unix_nano - p1.start_time_unix_nano) < 50_000_000


def test_collection_on_another_thread_never_sees_half_an_event() -> None:
    """The OTLP reader collects on its own thread while the loop records."""
    settings = Settings()
    settings.metrics.prometheus = False
    cumulative, delta = InMemoryMetricReader(), InMemoryMetricReader(preferred_temporality=DELTA)
    metrics = metrics_with(settings, [cumulative, delta], sdk_histograms=False)
    stop = threading.Event()
    bad: list = []
    delta_counts: list[int] = []

    def collect() -> None:
        while not stop.is_set():
            for attrs, p in _usage_point(cumulative).items():
                # every event records 7 tokens: a torn read breaks sum == 7 * count
                if p.sum != 7 * p.count or p.max != 7:
                    bad.append((dict(attrs), p.count, p.sum))
            delta_counts.extend(p.count for p in _usage_point(delta).values())

    thread = threading.Thread(target=collect)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    thread.start()
    try:
        for i in range(20_000):
            metrics.emit(_event(7, completion_tokens=7, labels={"team": f"t{i % 30}"}))
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    assert bad == []
    assert sum(p.count for p in _usage_point(cumulative).values()) == 2 * 20_000
    # nothing lost between a delta reader's intervals
    delta_counts.extend(p.count for p in _usage_point(delta).values())
    assert sum(delta_counts) == 2 * 20_000


@pytest.mark.parametrize("delta", [False, True])
def test_reader_added_later_sees_what_an_sdk_reader_would(delta: bool) -> None:
    settings = Settings()
    settings.metrics.prometheus = False
    got = {}
    for sdk_histograms in (False, True):
        metrics = metrics_with(settings, [], sdk_histograms=sdk_histograms)
        metrics.emit(_event(10))
        late = InMemoryMetricReader(preferred_temporality=DELTA if delta else None)
        metrics.add_metric_reader(late)
        metrics.add_metric_reader(late)  # twice: still one set of points
        metrics.emit(_event(20))
        got[sdk_histograms] = points(late.get_metrics_data())
    assert_same(got[False], got[True])
    (usage,) = [v for k, v in got[False].items() if k[1] == n.TOKEN_USAGE]
    assert sorted(p[:2] for p in usage.values()) == [(1, 3), (1, 20)]  # only what came after


def test_configurations_our_aggregation_cannot_reproduce_use_sdk_histograms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings()
    settings.metrics.prometheus = False
    exponential = InMemoryMetricReader(
        preferred_aggregation={HistogramInstrument: ExponentialBucketHistogramAggregation()})
    provider = MeterProvider(metric_readers=[exponential], shutdown_on_exit=False,
                             exemplar_filter=AlwaysOffExemplarFilter())
    metrics = UsageMetrics(settings, provider)
    assert metrics.histogram_fallback and "aggregation" in metrics.histogram_fallback
    metrics.emit(_event(10))
    data = exponential.get_metrics_data()
    kinds = {m.name: type(m.data) for rm in data.resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics}
    assert kinds[n.TOKEN_USAGE] is ExponentialHistogram

    # exemplars asked for by the environment
    monkeypatch.setenv("OTEL_METRICS_EXEMPLAR_FILTER", "always_on")
    reader = InMemoryMetricReader()
    metrics = UsageMetrics.from_settings(settings, extra_readers=[reader])
    assert metrics.histogram_fallback == "exemplars enabled"
    metrics.emit(_event(10))
    assert read(reader).point(n.TOKEN_USAGE, {
        n.OPERATION: "chat", n.PROVIDER: "vllm", n.REQUEST_MODEL: "m", n.RESPONSE_MODEL: "m",
        "team": "t", "feature": "unattributed", "env": "unattributed",
        n.TOKEN_TYPE: "input"}).exemplars

    # and the default sidecar configuration aggregates itself
    monkeypatch.delenv("OTEL_METRICS_EXEMPLAR_FILTER")
    assert UsageMetrics.from_settings(Settings()).histogram_fallback is None


def test_slot_cache_stays_bounded_under_a_label_flood(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record, "MAX_SLOTS", 50)
    settings = Settings()
    settings.metrics.prometheus = False
    settings.metrics.max_label_values = 1000
    reader = InMemoryMetricReader()
    metrics = UsageMetrics.from_settings(settings, extra_readers=[reader])
    for i in range(500):
        metrics.emit(_event(1, labels={"team": "t", "feature": f"f{i}"}))
    assert len(metrics._recorder._slots) <= 50  # noqa: SLF001
    snap = read(reader)
    assert sum(p.value for p in snap.metrics[n.TOKENS].values()) == 500 * (1 + 3)
    assert snap.series_count(n.TOKEN_USAGE) == 1000


async def test_otlp_delta_temporality_over_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    async with OtlpHttpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # only explicit flushes
        settings = Settings()
        settings.metrics.prometheus = False
        settings.metrics.otlp = True
        metrics = UsageMetrics.from_settings(settings)
        assert metrics.histogram_fallback is None
        metrics.emit(_event(10))
        metrics.emit(_event(20))
        assert await metrics.force_flush(timeout=10)
        metrics.emit(_event(5))
        assert await metrics.force_flush(timeout=10)
        await metrics.shutdown(timeout=10)

    def usage_inputs(request) -> list:
        return [p for rm in request.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics if m.name == n.TOKEN_USAGE
                for p in m.histogram.data_points
                if any(a.value.string_value == "input" for a in p.attributes)]

    temporality = {m.histogram.aggregation_temporality
                   for r in receiver.requests for rm in r.resource_metrics
                   for sm in rm.scope_metrics for m in sm.metrics if m.name in HISTOGRAMS}
    assert temporality == {1}  # AGGREGATION_TEMPORALITY_DELTA
    first, second = (usage_inputs(r) for r in receiver.requests[:2])
    assert [(p.count, p.sum, p.min, p.max) for p in first] == [(2, 30, 10, 20)]
    assert [(p.count, p.sum, p.min, p.max) for p in second] == [(1, 5, 5, 5)]
    assert second[0].start_time_unix_nano == first[0].time_unix_nano

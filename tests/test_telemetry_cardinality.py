"""Cardinality guard: a label flood keeps metric series (and memory) bounded."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import Settings
from extproc.events import TokenSource, UsageEvent
from extproc.telemetry import LabelGuard, UsageMetrics
from extproc.telemetry import names as n
from extproc.telemetry.cardinality import MAX_VALUE_LENGTH
from extproc.telemetry.counters import OVERFLOW_KEY, ExactCounter
from tests.telemetry_testing import read


def test_guard_keeps_first_values_then_other() -> None:
    guard = LabelGuard(3)
    assert [guard.value("feature", v) for v in "abcde"] == ["a", "b", "c", "other", "other"]
    assert guard.value("feature", "a") == "a"  # kept values stay
    assert guard.value("team", "d") == "d"  # budgets are per label
    assert guard.folded == {"feature": 2}
    assert guard.distinct("feature") == 3
    assert LabelGuard(0).value("team", "x") == "other"
    assert len(LabelGuard(5).value("team", "x" * 10_000)) == MAX_VALUE_LENGTH


def _flood_event(i: int) -> UsageEvent:
    return UsageEvent(
        endpoint="chat", request_model="m", response_model="m", stream=True, http_status=200,
        prompt_tokens=10, completion_tokens=3, token_source=TokenSource.UPSTREAM_USAGE,
        time_to_first_token_ns=10_000_000, duration_ns=40_000_000, metered=True,
        labels={"team": "t", "feature": f"feature-{i}", "env": "prod"},
    )


def test_label_flood_keeps_series_bounded() -> None:
    settings = Settings()
    settings.metrics.max_label_values = 20
    reader = InMemoryMetricReader()
    metrics = UsageMetrics.from_settings(settings, extra_readers=[reader])
    for i in range(10_000):
        metrics.emit(_flood_event(i))

    snap = read(reader)
    kept = 20 + 1  # 20 first values + "other"
    assert snap.series_count(n.TOKEN_USAGE) == kept * 2  # input, output
    assert snap.series_count(n.TOKENS) == kept * 4
    assert snap.series_count(n.REQUESTS) == kept
    assert snap.series_count(n.REQUEST_DURATION) == 1  # latency carries no labels by default
    features = {a["feature"] for a in snap.attribute_sets(n.TOKEN_USAGE)}
    assert features == {f"feature-{i}" for i in range(20)} | {"other"}
    # totals stay exact: folding changes attributes, never values
    inputs = {
        dict(attrs)["feature"]: point.value
        for attrs, point in snap.metrics[n.TOKENS].items()
        if dict(attrs)["token.type"] == "input"
    }
    assert sum(inputs.values()) == 10_000 * 10
    assert inputs["other"] == (10_000 - 20) * 10
    assert metrics.guard.folded["feature"] == 10_000 - 20
    assert snap.value(n.LABELS_FOLDED, {"label": "feature"}) == 10_000 - 20

    # The Prometheus exposition is bounded the same way.
    assert metrics.prometheus is not None
    body, _ = metrics.render_prometheus()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert len(families["extproc_tokens"].samples) == kept * 4


def test_model_flood_is_bounded_too() -> None:
    settings = Settings()
    settings.metrics.max_label_values = 5
    settings.metrics.prometheus = False
    reader = InMemoryMetricReader()
    metrics = UsageMetrics.from_settings(settings, extra_readers=[reader])
    for i in range(1000):
        metrics.emit(UsageEvent(endpoint="chat", request_model=f"model-{i}", metered=True,
                                http_status=404, token_source=TokenSource.NONE,
                                duration_ns=1_000_000))
    snap = read(reader)
    models = {a[n.REQUEST_MODEL] for a in snap.attribute_sets(n.REQUEST_DURATION)}
    assert len(models) == 6 and "other" in models


def test_exact_counter_overflows_like_the_sdk() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader], shutdown_on_exit=False).get_meter("t")
    counter = ExactCounter(meter, "c", unit="1", description="", max_series=10)
    for i in range(100):
        counter.add(2, (("k", str(i)),))
    assert len(counter) == 11  # 10 distinct sets + the overflow series, as the SDK does
    assert counter.value(OVERFLOW_KEY) == 2 * 90
    assert counter.value((("k", "3"),)) == 2
    snap = read(reader)
    assert snap.series_count("c") == 11
    assert snap.value("c", {"otel.metric.overflow": True}) == 180
    assert sum(p.value for p in snap.metrics["c"].values()) == 200  # totals stay exact


def test_max_series_setting_bounds_sdk_and_exact_counters() -> None:
    settings = Settings()
    settings.metrics.max_series = 30
    settings.metrics.max_label_values = 1000
    metrics = UsageMetrics.from_settings(settings)
    for i in range(500):
        metrics.emit(_flood_event(i))
    body, _ = metrics.render_prometheus()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert len(families["extproc_tokens"].samples) == 31
    assert len(families["extproc_requests"].samples) == 31
    usage = [s for s in families["gen_ai_client_token_usage"].samples
             if s.name.endswith("_count")]
    assert len(usage) == 31
    assert sum(s.value for s in families["extproc_requests"].samples) == 500

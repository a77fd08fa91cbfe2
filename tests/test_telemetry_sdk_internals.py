"""The OpenTelemetry SDK internals the usage histograms rely on (extproc/telemetry/sdk_internals.py).
A new SDK that renames or drops one fails here, naming it; the sidecar itself then falls back to
SDK histograms (tested below), so it keeps exporting the same metrics, only slower."""

from __future__ import annotations

import opentelemetry.sdk.version
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData

from extproc.telemetry import histograms, sdk_internals
from extproc.telemetry.counters import DEFAULT_MAX_SERIES


def test_every_sdk_internal_extproc_reads_is_there() -> None:
    gone = sdk_internals.missing()
    assert gone == [], (
        f"opentelemetry-sdk {opentelemetry.sdk.version.__version__} no longer has: "
        f"{'; '.join(gone)}. extproc falls back to SDK histograms (slower); update "
        "extproc/telemetry/sdk_internals.py for this SDK, or pin the one it was written for")


def test_what_the_internals_say_about_a_default_reader() -> None:
    reader = InMemoryMetricReader()
    # as extproc builds it (export.build_meter_provider): exemplars off
    provider = MeterProvider(metric_readers=[reader], exemplar_filter=AlwaysOffExemplarFilter())
    try:
        assert sdk_internals.provider_readers(provider) == [reader]
        assert sdk_internals.provider_disabled(provider) is False
        assert not sdk_internals.configured_views(sdk_internals.provider_config(provider))
        assert sdk_internals.histogram_cardinality_limit(reader) in (None, DEFAULT_MAX_SERIES)
        assert histograms.reader_supported(reader)
        assert histograms.fast_path_blocker(provider) is None
    finally:
        provider.shutdown()


def test_the_collection_hook_sees_what_the_reader_exports() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    seen: list[MetricsData] = []
    try:
        provider.get_meter("t").create_counter("c").add(1)
        sdk_internals.hook_collection(reader, lambda data: seen.append(data) or data)
        data = reader.get_metrics_data()
        assert seen and seen[0] is data  # the hook ran on this collection, its result exported
    finally:
        provider.shutdown()


def test_an_sdk_without_them_gets_sdk_histograms_and_says_why(monkeypatch) -> None:
    monkeypatch.setattr(sdk_internals, "ATTRIBUTES", (
        *sdk_internals.ATTRIBUTES, ("MetricReader", "_renamed_in_a_future_sdk", "a test"),
    ))
    monkeypatch.setattr(histograms, "_SDK_MISSING", None)
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    try:
        why = histograms.fast_path_blocker(provider)
        assert why == "this OpenTelemetry SDK lacks MetricReader._renamed_in_a_future_sdk (a test)"
    finally:
        provider.shutdown()
    monkeypatch.setattr(histograms, "_SDK_MISSING", None)  # the next caller checks again

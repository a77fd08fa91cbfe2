"""Every private OpenTelemetry SDK attribute extproc relies on, in one place.

histograms.py aggregates the usage histograms itself (an SDK Histogram.record costs several
times more per event) and hands the points to the SDK's readers; for that it reads how each
reader and the MeterProvider are configured, and hooks the one method every reader's
collection goes through. None of that is public SDK API: it is read here only, each attribute
named once in ATTRIBUTES, and `missing()` says which of them this SDK lacks. When any is
missing, fast_path_blocker() answers with that, and the recorder uses real SDK histograms
(slower, same metrics) instead of failing; tests/test_telemetry_sdk_internals.py fails,
naming the attribute, so an SDK upgrade is noticed before it ships.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.metrics import Histogram as _SdkHistogramClass
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader, MetricsData
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation

# (owner, attribute, what extproc reads it for)
ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("MeterProvider", "_metric_readers", "the readers a provider was built with"),
    ("MeterProvider", "_sdk_config", "its configuration (views, exemplar filter)"),
    ("MeterProvider._sdk_config", "views", "views change what a histogram exports"),
    ("MeterProvider._sdk_config", "exemplar_filter", "exemplars are not reproduced"),
    ("MeterProvider", "_disabled", "OTEL_SDK_DISABLED"),
    ("MetricReader", "_instrument_class_aggregation", "a reader's histogram aggregation"),
    ("MetricReader", "_instrument_class_temporality", "a reader's histogram temporality"),
    ("MetricReader", "_instrument_class_cardinality_limit", "a reader's series limit"),
    ("MetricReader", "_receive_metrics", "the hook every reader's collection goes through"),
    ("ExplicitBucketHistogramAggregation", "_boundaries", "None: the instrument's advisory"),
    ("ExplicitBucketHistogramAggregation", "_record_min_max", "min and max are exported"),
)


def missing() -> list[str]:
    """The ATTRIBUTES this SDK lacks, each as 'Owner.attribute (what for)'; [] when all are
    there. Checked on real objects: a provider with a reader, a default aggregation."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    try:
        owners: dict[str, Any] = {
            "MeterProvider": provider,
            "MeterProvider._sdk_config": getattr(provider, "_sdk_config", None),
            "MetricReader": reader,
            "ExplicitBucketHistogramAggregation": ExplicitBucketHistogramAggregation(),
        }
        out = []
        for owner, name, why in ATTRIBUTES:
            obj = owners[owner]
            if obj is None or not hasattr(obj, name):
                out.append(f"{owner}.{name} ({why})")
        if hasattr(reader, "_receive_metrics") and not callable(reader._receive_metrics):
            out.append("MetricReader._receive_metrics (not a method any more)")
        return out
    finally:
        provider.shutdown()


def for_histograms(table: Any) -> Any:
    """A reader's per-instrument-class setting for histograms (None when it has none)."""
    for cls, value in (table or {}).items():
        if isinstance(cls, type) and issubclass(cls, _SdkHistogramClass):
            return value
    return None


def provider_readers(provider: Any) -> list[MetricReader] | None:
    """The readers an SDK MeterProvider was built with (None for other providers)."""
    readers = getattr(provider, "_metric_readers", None)
    return None if readers is None else list(readers)


def provider_config(provider: Any) -> Any:
    """The provider's SdkConfiguration (views, exemplar_filter), None for other providers."""
    return getattr(provider, "_sdk_config", None)


def configured_views(config: Any) -> Any:
    return getattr(config, "views", ())


def exemplar_filter(config: Any) -> Any:
    return getattr(config, "exemplar_filter", None)


def provider_disabled(provider: Any) -> bool:
    return bool(getattr(provider, "_disabled", False))


def histogram_aggregation(reader: MetricReader) -> Any:
    return for_histograms(getattr(reader, "_instrument_class_aggregation", None))


def histogram_temporality(reader: MetricReader) -> Any:
    return for_histograms(getattr(reader, "_instrument_class_temporality", None))


def histogram_cardinality_limit(reader: MetricReader) -> Any:
    return for_histograms(getattr(reader, "_instrument_class_cardinality_limit", None))


def advisory_buckets_with_min_max(aggregation: Any) -> bool:
    """An explicit-bucket aggregation that takes the instrument's advisory boundaries and
    records min and max: what the OTLP exporter sets by default."""
    return (
        type(aggregation) is ExplicitBucketHistogramAggregation
        and getattr(aggregation, "_boundaries", 0) is None
        and getattr(aggregation, "_record_min_max", False) is True
    )


def hook_collection(reader: MetricReader,
                    merge: Callable[[MetricsData], MetricsData]) -> None:
    """From now on, what the SDK collects for `reader` passes through merge() before the
    reader exports it (Prometheus, OTLP, in-memory: all implement _receive_metrics)."""
    receive = reader._receive_metrics

    def receive_with_ours(metrics_data: MetricsData, *args: Any, **kwargs: Any) -> Any:
        return receive(merge(metrics_data), *args, **kwargs)

    reader._receive_metrics = receive_with_ours  # type: ignore[method-assign]

"""OpenTelemetry metrics for the sidecar: GenAI semconv histograms, exact token/request
counters, self-metrics, Prometheus text for the admin /metrics, OTLP push, vLLM re-export.

Wiring (see UsageMetrics):
    metrics = UsageMetrics.from_settings(settings, stats)   # startup, before the gRPC server
    sinks = [storage_sink, metrics]; metrics.attach_storage(storage_sink)
    await metrics.start()                                   # starts the vLLM scraper if set
    body, ctype = metrics.render_prometheus(request.headers.get("Accept"))  # admin /metrics
    await metrics.shutdown()                                # after the storage sink
"""

from extproc.telemetry.cardinality import LabelGuard
from extproc.telemetry.export import PrometheusHandle, build_meter_provider, otlp_exporter
from extproc.telemetry.record import Pricing
from extproc.telemetry.sink import UsageMetrics
from extproc.telemetry.vllm_scrape import VllmScraper, parse_vllm_metrics

__all__ = [
    "LabelGuard",
    "Pricing",
    "PrometheusHandle",
    "UsageMetrics",
    "VllmScraper",
    "build_meter_provider",
    "otlp_exporter",
    "parse_vllm_metrics",
]

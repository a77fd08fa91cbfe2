"""MeterProvider with its readers: Prometheus text for the admin /metrics, OTLP per OTEL_* env."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    CardinalityLimits,
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from extproc import __version__
from extproc.config import ConfigError, Settings
from extproc.telemetry.otel_env import ExportPlan, export_plan
from extproc.telemetry.prometheus_reader import PrometheusPullReader

log = logging.getLogger(__name__)

SERVICE_NAME = "extproc"
# OTLP spec default; Python's `opentelemetry-instrument` picks grpc instead, so say it loudly in
# the docs: set OTEL_EXPORTER_OTLP_PROTOCOL=grpc for a :4317 endpoint.
DEFAULT_OTLP_PROTOCOL = "http/protobuf"


class PrometheusHandle:
    """The sidecar's own prometheus_client registry (never the global one)."""

    def __init__(self, reader: PrometheusPullReader, registry: CollectorRegistry) -> None:
        self.reader = reader
        self.registry = registry

    def render_prometheus(self, accept: str | None = None) -> tuple[bytes, str]:
        """Exposition body and its Content-Type, negotiated from the scraper's Accept header.

        Without Accept (or for plain text) this is text format 0.0.4. Runs the observable
        callbacks synchronously: cheap, but call it from the admin handler, not per request.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def otlp_protocol(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or DEFAULT_OTLP_PROTOCOL
    ).strip()
    if protocol not in ("grpc", "http/protobuf"):
        raise ConfigError(
            f"unsupported OTLP protocol {protocol!r} (grpc or http/protobuf; http/json is not "
            "implemented by the Python exporter)"
        )
    return protocol


def otlp_exporter(environ: Mapping[str, str] | None = None) -> MetricExporter:
    """An OTLP metric exporter; endpoint, headers, TLS, timeout, compression and temporality
    come from the standard OTEL_EXPORTER_OTLP_[METRICS_]* variables, read by the exporter."""
    protocol = otlp_protocol(environ)
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError as exc:
        # Seen when xds-protos overwrote opentelemetry/proto/* with older copies.
        raise RuntimeError(
            f"cannot import the OTLP {protocol} metric exporter ({exc}); if xds-protos is "
            "installed in this environment it shadows opentelemetry-proto: reinstall "
            "opentelemetry-proto or remove xds-protos"
        ) from exc
    return OTLPMetricExporter()


def default_resource() -> Resource:
    """SDK defaults + OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, which win over our
    service.name=extproc and service.version."""
    env = Resource.create({})
    ours = Resource({"service.name": SERVICE_NAME, "service.version": __version__})
    if str(env.attributes.get("service.name", "")).startswith("unknown_service"):
        return env.merge(ours)  # the right-hand side wins a merge
    return ours.merge(env)


def plan_summary(plan: ExportPlan) -> str:
    names = [n for n, on in (("prometheus", plan.prometheus), ("otlp", plan.otlp),
                             ("console", plan.console)) if on]
    return ", ".join(names) or "none"


def cardinality_limits(max_series: int) -> CardinalityLimits:
    """The same per-metric series limit for every instrument kind (ExactCounter uses it too)."""
    # (no synchronous Gauge: we use none, and the SDK does not export its class publicly)
    kinds = (Counter, UpDownCounter, Histogram, ObservableCounter, ObservableUpDownCounter,
             ObservableGauge)
    return dict.fromkeys(kinds, max(2, max_series))


def build_meter_provider(
    settings: Settings,
    *,
    extra_readers: Sequence[MetricReader] = (),
    resource: Resource | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[MeterProvider, PrometheusHandle | None]:
    """Readers per the OTEL_* variables and settings.metrics (otel_env.export_plan):
    Prometheus (pull, admin /metrics), OTLP and console (push, periodic, interval from
    OTEL_METRIC_EXPORT_INTERVAL, default 60 s). Not registered as the global provider, so tests
    and embedders can build several."""
    env = os.environ if environ is None else environ
    plan = export_plan(settings, env)
    log.info("metric exporters: %s (%s)", plan_summary(plan), plan.reason)
    readers: list[MetricReader] = list(extra_readers)
    handle: PrometheusHandle | None = None
    limits = cardinality_limits(settings.metrics.max_series)
    if plan.prometheus:
        registry = CollectorRegistry(auto_describe=True)
        reader = PrometheusPullReader(registry=registry, cardinality_limits=limits)
        handle = PrometheusHandle(reader, registry)
        readers.append(reader)
    if plan.otlp:
        readers.append(
            PeriodicExportingMetricReader(otlp_exporter(env), cardinality_limits=limits)
        )
    if plan.console:
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), cardinality_limits=limits))
    # Exemplars need traces, which the sidecar does not produce: skip the per-measurement cost
    # unless explicitly asked for.
    exemplar_filter = (
        None if os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER") else AlwaysOffExemplarFilter()
    )
    provider = MeterProvider(
        metric_readers=readers,
        resource=resource or default_resource(),
        exemplar_filter=exemplar_filter,
        # The owner (UsageMetrics.shutdown) shuts it down, once; an atexit hook would race it.
        shutdown_on_exit=False,
    )
    return provider, handle

"""Which metric exporters run, decided from the OpenTelemetry SDK's standard variables first and
the sidecar's `metrics.prometheus` / `metrics.otlp` keys second (pure: environ in, plan out).

Precedence (README "Metrics"):
1. OTEL_SDK_DISABLED=true: no exporter at all (the SDK hands out no-op meters anyway).
2. OTEL_METRICS_EXPORTER set: exactly the exporters it lists (otlp, prometheus, console; none).
   `prometheus` is served on the admin port's /metrics, not on a port of its own.
3. Unset: `metrics.prometheus` and `metrics.otlp` as configured, and OTLP also runs when an
   OTLP endpoint variable is set. The specification's default would be otlp to
   localhost:4318; a sidecar with nobody listening there would only log export failures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from extproc.config import ConfigError, Settings

EXPORTERS = ("otlp", "prometheus", "console", "none")
# OTLP endpoint variables (generic and metrics-specific), as the OTLP exporter reads them.
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")


@dataclass(frozen=True)
class ExportPlan:
    prometheus: bool
    otlp: bool
    console: bool
    # why this plan, for the startup log and the admin API's 404
    reason: str


def sdk_disabled(environ: Mapping[str, str]) -> bool:
    # The specification: only a case-insensitive "true" disables; anything else is false.
    return environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def parse_exporters(value: str) -> frozenset[str]:
    """OTEL_METRICS_EXPORTER's comma list; unknown names and `none` with others are refused."""
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in EXPORTERS]
    if unknown:
        raise ConfigError(f"OTEL_METRICS_EXPORTER: unknown exporter {', '.join(map(repr, unknown))} "
                          f"(one or more of {', '.join(EXPORTERS)})")
    if "none" in names and len(set(names)) > 1:
        raise ConfigError(f"OTEL_METRICS_EXPORTER={value!r}: 'none' cannot be combined with other exporters")
    return frozenset(names)


def export_plan(settings: Settings, environ: Mapping[str, str]) -> ExportPlan:
    if sdk_disabled(environ):
        return ExportPlan(False, False, False, "OTEL_SDK_DISABLED=true")
    listed = environ.get("OTEL_METRICS_EXPORTER", "").strip()
    if listed:
        names = parse_exporters(listed)
        return ExportPlan("prometheus" in names, "otlp" in names, "console" in names,
                          f"OTEL_METRICS_EXPORTER={listed}")
    endpoint = next((v for v in ENDPOINT_VARS if environ.get(v, "").strip()), None)
    otlp = settings.metrics.otlp or endpoint is not None
    why = "metrics.prometheus/metrics.otlp" + (f" and {endpoint}" if endpoint and not settings.metrics.otlp else "")
    return ExportPlan(settings.metrics.prometheus, otlp, False, why)

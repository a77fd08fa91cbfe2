"""The standard OTEL_* variables decide the metric exporters (otel_env.export_plan), before the
sidecar's own metrics.* keys; bad values are refused with the variable's name."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

from extproc.config import ConfigError, Settings
from extproc.telemetry.export import build_meter_provider
from extproc.telemetry.histograms import provider_readers
from extproc.telemetry.otel_env import export_plan, parse_exporters


def _settings(prometheus: bool = True, otlp: bool = False) -> Settings:
    s = Settings()
    s.metrics.prometheus, s.metrics.otlp = prometheus, otlp
    return s


def _on(plan) -> tuple[bool, bool, bool]:
    return plan.prometheus, plan.otlp, plan.console


def test_unset_keeps_the_metrics_keys() -> None:
    assert _on(export_plan(_settings(), {})) == (True, False, False)
    assert _on(export_plan(_settings(False, True), {})) == (False, True, False)


def test_an_otlp_endpoint_alone_turns_otlp_on() -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        plan = export_plan(_settings(), {var: "http://collector:4318"})
        assert _on(plan) == (True, True, False) and var in plan.reason
    assert _on(export_plan(_settings(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "})) == (True, False, False)


@pytest.mark.parametrize(("value", "want"), [
    ("otlp", (False, True, False)),
    ("prometheus", (True, False, False)),
    ("console", (False, False, True)),
    ("none", (False, False, False)),
    ("otlp,prometheus", (True, True, False)),
    (" OTLP , console ", (False, True, True)),
    ("otlp,otlp", (False, True, False)),
])
def test_otel_metrics_exporter_wins_over_the_keys(value: str, want: tuple[bool, bool, bool]) -> None:
    # metrics.otlp=false and metrics.prometheus=true are both overridden by the list
    plan = export_plan(_settings(True, False), {"OTEL_METRICS_EXPORTER": value})
    assert _on(plan) == want
    assert "OTEL_METRICS_EXPORTER" in plan.reason


@pytest.mark.parametrize("value", ["true", "TRUE", " True "])
def test_sdk_disabled_turns_everything_off(value: str) -> None:
    env = {"OTEL_SDK_DISABLED": value, "OTEL_METRICS_EXPORTER": "otlp,prometheus",
           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}
    plan = export_plan(_settings(True, True), env)
    assert _on(plan) == (False, False, False) and plan.reason == "OTEL_SDK_DISABLED=true"


@pytest.mark.parametrize("value", ["false", "1", "yes", ""])
def test_sdk_disabled_only_by_true(value: str) -> None:
    # the specification: any value other than a case-insensitive "true" leaves the SDK on
    assert _on(export_plan(_settings(), {"OTEL_SDK_DISABLED": value})) == (True, False, False)


@pytest.mark.parametrize(("value", "message"), [
    ("jaeger", "unknown exporter 'jaeger'"),
    ("otlp,zipkin,logging", "'zipkin', 'logging'"),
    ("none,otlp", "'none' cannot be combined"),
])
def test_bad_exporter_lists_are_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match="OTEL_METRICS_EXPORTER") as err:
        parse_exporters(value)
    assert message in str(err.value)
    with pytest.raises(ConfigError):
        build_meter_provider(_settings(), environ={"OTEL_METRICS_EXPORTER": value})


def test_provider_gets_the_planned_readers() -> None:
    provider, handle = build_meter_provider(_settings(), environ={"OTEL_METRICS_EXPORTER": "console"})
    try:
        readers = provider_readers(provider)
        assert handle is None
        assert len(readers) == 1 and isinstance(readers[0], PeriodicExportingMetricReader)
        assert isinstance(readers[0]._exporter, ConsoleMetricExporter)
    finally:
        provider.shutdown()
    provider, handle = build_meter_provider(_settings(False, False), environ={"OTEL_SDK_DISABLED": "true"})
    assert handle is None and not provider_readers(provider)
    provider.shutdown()

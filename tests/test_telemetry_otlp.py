"""OTLP over the wire (HTTP and gRPC) into tiny receivers on 127.0.0.1, decoded and checked."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

from extproc.config import ConfigError, Settings
from extproc.events import TokenSource, UsageEvent
from extproc.telemetry import UsageMetrics
from extproc.telemetry import names as n
from extproc.telemetry.export import otlp_protocol
from tests.telemetry_testing import OtlpGrpcReceiver, OtlpHttpReceiver

ATTRS = {
    n.OPERATION: "chat", n.PROVIDER: "vllm", n.REQUEST_MODEL: "llama",
    n.RESPONSE_MODEL: "llama", "team": "search", "feature": "autocomplete", "env": "prod",
}


def _event(prompt: int = 100) -> UsageEvent:
    return UsageEvent(
        endpoint="chat", request_model="llama", response_model="llama", stream=True,
        http_status=200, prompt_tokens=prompt, completion_tokens=21, cached_tokens=8,
        token_source=TokenSource.UPSTREAM_USAGE, time_to_first_token_ns=50_000_000,
        duration_ns=250_000_000, metered=True,
        labels={"team": "search", "feature": "autocomplete", "env": "prod"},
    )


def test_otlp_exporters_import_without_the_xds_protos_clash() -> None:
    """xds-protos ships old opentelemetry/proto copies (NOTES.md); they must not be here."""
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as G
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as H
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    assert G and H and InstrumentationScope
    module = importlib.import_module("opentelemetry.proto.common.v1.common_pb2")
    dist = importlib.metadata.distribution("opentelemetry-proto")
    owned = {Path(str(dist.locate_file(f))).resolve() for f in dist.files or ()}
    assert Path(module.__file__).resolve() in owned
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("xds-protos")


def test_protocol_selection() -> None:
    assert otlp_protocol({}) == "http/protobuf"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                          "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"}) == "http/protobuf"
    with pytest.raises(ConfigError):
        otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def _otlp_settings() -> Settings:
    settings = Settings()
    settings.metrics.prometheus = False
    settings.metrics.otlp = True
    return settings


def _check(snap, prompt_total: int, count: int) -> None:
    usage = snap.point(n.TOKEN_USAGE, {**ATTRS, n.TOKEN_TYPE: "input"})
    assert (usage.count, usage.sum) == (count, prompt_total)
    assert list(usage.explicit_bounds) == list(n.TOKEN_BUCKETS)
    assert sum(usage.bucket_counts) == count
    assert snap.value(n.TOKENS, {**ATTRS, "token.type": "input"}) == prompt_total
    assert snap.value(n.TOKENS, {**ATTRS, "token.type": "cached"}) == 8 * count
    ttft = snap.point(n.TIME_TO_FIRST_TOKEN, {k: ATTRS[k] for k in list(ATTRS)[:4]})
    assert ttft.count == count and ttft.sum == pytest.approx(0.05 * count)


async def test_otlp_http(monkeypatch: pytest.MonkeyPatch) -> None:
    async with OtlpHttpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=chargeback")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # only explicit flushes
        monkeypatch.setenv("OTEL_SERVICE_NAME", "extproc-test")
        metrics = UsageMetrics.from_settings(_otlp_settings())
        metrics.emit(_event(100))
        metrics.emit(_event(300))
        assert await metrics.force_flush(timeout=10)
        assert receiver.requests, "nothing exported"
        assert receiver.headers[-1]["x-tenant"] == "chargeback"
        assert receiver.headers[-1]["Content-Encoding"] == "gzip"
        resource = {a.key: a.value.string_value
                    for a in receiver.requests[-1].resource_metrics[0].resource.attributes}
        assert resource["service.name"] == "extproc-test"
        assert resource["service.version"]
        _check(receiver.snapshot(), 400, 2)

        # shutdown pushes what was recorded since the last export
        metrics.emit(_event(50))
        await metrics.shutdown(timeout=10)
        _check(receiver.snapshot(), 450, 3)


async def test_otlp_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    async with OtlpGrpcReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
        metrics = UsageMetrics.from_settings(_otlp_settings())
        metrics.emit(_event(100))
        assert await metrics.force_flush(timeout=10)
        snap = receiver.snapshot()
        _check(snap, 100, 1)
        resource = {a.key: a.value.string_value
                    for a in receiver.requests[-1].resource_metrics[0].resource.attributes}
        assert resource["service.name"] == "extproc"
        await metrics.shutdown(timeout=10)

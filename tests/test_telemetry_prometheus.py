"""Prometheus exposition for the admin /metrics, parsed with prometheus_client's parsers."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import Settings
from extproc.events import TokenSource, UsageEvent
from extproc.stats import SidecarStats
from extproc.telemetry import UsageMetrics, build_meter_provider

LABELS = {"team": "search", "feature": "autocomplete", "env": "prod"}


def _event(**kw) -> UsageEvent:
    base = dict(
        endpoint="chat", request_model="llama", response_model="llama", stream=True,
        http_status=200, prompt_tokens=100, completion_tokens=21, cached_tokens=64,
        token_source=TokenSource.UPSTREAM_USAGE, time_to_first_token_ns=50_000_000,
        duration_ns=250_000_000, metered=True, labels=LABELS,
    )
    base.update(kw)
    return UsageEvent(**base)


def _samples(body: bytes) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _find(samples: list, **labels: str) -> float:
    hits = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (labels, samples)
    return hits[0]


def test_exposition_names_and_values() -> None:
    metrics = UsageMetrics.from_settings(Settings(), SidecarStats(streams_opened=3))
    metrics.emit(_event())
    metrics.emit(_event(prompt_tokens=50))
    body, content_type = metrics.render_prometheus()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    samples = _samples(body)

    # The standard OTel -> Prometheus translation, as produced by the exporter.
    for name in (
        "gen_ai_client_token_usage_bucket", "gen_ai_client_token_usage_count",
        "gen_ai_client_token_usage_sum",
        "gen_ai_server_request_duration_seconds_bucket",
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "gen_ai_server_time_per_output_token_seconds_bucket",
        "extproc_tokens_total", "extproc_requests_total",
        "extproc_ext_proc_streams_opened_total", "extproc_ext_proc_streams_active",
        "target_info",
    ):
        assert name in samples, name

    common = dict(gen_ai_operation_name="chat", gen_ai_provider_name="vllm",
                  gen_ai_request_model="llama", gen_ai_response_model="llama", **LABELS)
    buckets = samples["gen_ai_client_token_usage_bucket"]
    assert _find(buckets, gen_ai_token_type="input", le="64.0", **common) == 1  # 50
    assert _find(buckets, gen_ai_token_type="input", le="256.0", **common) == 2  # 50, 100
    assert _find(buckets, gen_ai_token_type="input", le="+Inf", **common) == 2
    assert _find(samples["gen_ai_client_token_usage_sum"], gen_ai_token_type="input",
                 **common) == 150
    tokens = samples["extproc_tokens_total"]
    assert _find(tokens, token_type="input", **common) == 150
    assert _find(tokens, token_type="cached", **common) == 128
    assert _find(samples["extproc_requests_total"], endpoint="chat", http_status_class="2xx",
                 metered="true", client_aborted="false", token_source="upstream_usage") == 2
    assert _find(samples["extproc_ext_proc_streams_opened_total"]) == 3
    ttft_le = {s.labels["le"] for s in samples["gen_ai_server_time_to_first_token_seconds_bucket"]}
    assert {"0.001", "10.0", "+Inf"} <= ttft_le


def test_openmetrics_negotiation() -> None:
    metrics = UsageMetrics.from_settings(Settings())
    metrics.emit(_event())
    body, content_type = metrics.render_prometheus(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    )
    assert content_type.startswith("application/openmetrics-text")
    names = {f.name for f in openmetrics_families(body.decode())}
    assert {"extproc_tokens", "gen_ai_client_token_usage"} <= names


def test_registries_are_private_and_independent() -> None:
    a = UsageMetrics.from_settings(Settings())
    b = UsageMetrics.from_settings(Settings())
    a.emit(_event())
    assert b"extproc_tokens_total{" in a.render_prometheus()[0]
    assert b"extproc_tokens_total{" not in b.render_prometheus()[0]
    assert b"extproc_" not in generate_latest(REGISTRY)


async def test_prometheus_disabled() -> None:
    settings = Settings()
    settings.metrics.prometheus = False
    provider, handle = build_meter_provider(settings)
    assert handle is None
    metrics = UsageMetrics(settings, provider)
    with pytest.raises(LookupError):
        metrics.render_prometheus()
    await metrics.shutdown()

"""Flushes do not multiply metrics: the admin /metrics after several POST /v1/flush and
GET /v1/usage (each one a MeterProvider.force_flush) shows every family and series once, with
the right values, and the OTLP exports those flushes push (cumulative and delta) count every
request once. Real stack: openai client -> Envoy -> sidecar (chDB) -> simulator, the real
OTLP/HTTP exporter to a receiver on loopback."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter as Tally
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from prometheus_client.parser import text_string_to_metric_families

from tests.k8s_render import ROOT
from tests.stack import metered_stack, sidecar_settings, start_sim, wait_events
from tests.telemetry_testing import OtlpHttpReceiver, ReceiverLoop

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PRICES = ROOT / "deploy" / "pricing.example.yaml"
TEAM = "flushers"
MSG = [{"role": "user", "content": "How many series does a scrape show after three flushes?"}]
DELTA = {k: AggregationTemporality.DELTA for k in (
    Counter, UpDownCounter, Histogram, ObservableCounter, ObservableUpDownCounter, ObservableGauge)}


class Receivers(ReceiverLoop):
    """A cumulative and a delta OTLP/HTTP receiver on a loop of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.cumulative = self.enter(OtlpHttpReceiver())
        self.delta = self.enter(OtlpHttpReceiver())


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Any]:
    work = tmp_path_factory.mktemp("flush")
    rx = Receivers()
    # The interval is long: only the flushes (and the shutdown) export.
    readers = [
        PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{rx.cumulative.endpoint}/v1/metrics"),
            export_interval_millis=600_000),
        PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{rx.delta.endpoint}/v1/metrics",
                               preferred_temporality=DELTA),
            export_interval_millis=600_000),
    ]
    sim, sim_url = start_sim(work, "--tokens-per-second", "0")
    settings = sidecar_settings(work, pricing={"file": str(PRICES)})

    class Stack:
        pass

    try:
        with metered_stack(work, sim_url, settings, metric_readers=readers) as (url, rec, sc):
            s = Stack()
            s.url, s.rec, s.rx, s.admin = url, rec, rx, f"http://127.0.0.1:{sc.sidecar.admin_port}"
            yield s
    finally:
        sim.stop()
        rx.close()


def _get(url: str, method: str = "GET") -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as r:
        assert r.status == 200, url
        return r.read()


def _requests(stack: Any, user: str, team: str = TEAM) -> tuple[int, int]:
    """One plain and one streaming chat through Envoy; (prompt, completion) tokens the
    upstream reported."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="k", max_retries=0,
                           default_headers={"x-team": team, "x-user": user})
    plain = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=7)
    assert plain.usage is not None
    prompt, completion = plain.usage.prompt_tokens, plain.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MSG * 2, max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None
    prompt += usage.prompt_tokens
    completion += usage.completion_tokens
    events = wait_events(stack.rec, user, 2)  # emitted to every sink, the metrics included
    assert all(e.price_status == "priced" for e in events)
    return prompt, completion


def _list_cost_usd(stack: Any) -> float:
    """The stored list cost of the team's events (exact micro-USD), in USD."""
    micros = sum(e.list_cost_micros for e in stack.rec.events if e.labels.get("team") == TEAM)
    assert micros > 0
    return float(Decimal(micros) / 1_000_000)


def _scrape(stack: Any) -> dict[str, list[Any]]:
    """/metrics, checked to show each family's HELP and TYPE and each series exactly once."""
    text = _get(f"{stack.admin}/metrics").decode()
    lines = text.splitlines()
    for prefix in ("# HELP ", "# TYPE "):
        names = Tally(line.split(" ")[2] for line in lines if line.startswith(prefix))
        assert names and max(names.values()) == 1, {n: c for n, c in names.items() if c > 1}
    series = Tally(line.rsplit(" ", 1)[0] for line in lines if line and not line.startswith("#"))
    assert max(series.values()) == 1, [s for s, c in series.items() if c > 1][:5]
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _team_value(samples: dict[str, list[Any]], name: str, team: str = TEAM, **labels: str) -> float:
    hits = [s.value for s in samples.get(name, [])
            if s.labels.get("team") == team and all(s.labels.get(k) == v for k, v in labels.items())]
    assert hits, (name, labels)
    return sum(hits)


def _otlp_points(req: metrics_service_pb2.ExportMetricsServiceRequest, name: str,
                 **labels: str) -> list[Any]:
    points = []
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != name:
                    continue
                for p in getattr(metric, metric.WhichOneof("data")).data_points:
                    attrs = {a.key: a.value.string_value for a in p.attributes}
                    if attrs.get("team") == TEAM and all(attrs.get(k) == v for k, v in labels.items()):
                        points.append(p)
    return points


def _check_export_shape(req: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
    """One export holds each metric once per scope and each attribute set once per metric."""
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            names = Tally(m.name for m in sm.metrics)
            assert max(names.values()) == 1, names
            for metric in sm.metrics:
                points = getattr(metric, metric.WhichOneof("data")).data_points
                keys = Tally(tuple(sorted((a.key, str(a.value)) for a in p.attributes))
                             for p in points)
                assert not keys or max(keys.values()) == 1, metric.name


def _int_value(p: Any) -> float:
    return p.as_int if p.WhichOneof("value") == "as_int" else p.as_double


def test_flushes_do_not_repeat_series_in_metrics_or_otlp(stack) -> None:
    prompt, completion = _requests(stack, "u1")
    for _ in range(3):
        assert json.loads(_get(f"{stack.admin}/v1/flush", "POST")) == {"flushed": True}
    rows = json.loads(_get(f"{stack.admin}/v1/usage?team={TEAM}&by=team"))["rows"]
    assert rows and rows[0]["requests"] == 2

    samples = _scrape(stack)
    assert _team_value(samples, "extproc_requests_total") == 2
    assert _team_value(samples, "extproc_tokens_total", token_type="input") == prompt
    assert _team_value(samples, "extproc_tokens_total", token_type="output") == completion
    assert _team_value(samples, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == 2
    assert _team_value(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == prompt
    assert _team_value(samples, "extproc_cost_usd_total") == pytest.approx(_list_cost_usd(stack))

    # more traffic and flushes: the next scrape moves on, still once per series
    p2, c2 = _requests(stack, "u2")
    for _ in range(2):
        _get(f"{stack.admin}/v1/flush", "POST")
    samples = _scrape(stack)
    assert _team_value(samples, "extproc_requests_total") == 4
    assert _team_value(samples, "extproc_tokens_total", token_type="input") == prompt + p2
    assert _team_value(samples, "extproc_tokens_total", token_type="output") == completion + c2
    assert _team_value(samples, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == 4
    assert _team_value(samples, "extproc_cost_usd_total") == pytest.approx(_list_cost_usd(stack))
    assert len(_scrape(stack)["extproc_requests_total"]) == len(samples["extproc_requests_total"])

    # OTLP: 6 flushes (3 + /v1/usage + 2) each pushed one export to each receiver
    cumulative, delta = stack.rx.cumulative.requests, stack.rx.delta.requests
    assert len(cumulative) == len(delta) == 6
    for req in (*cumulative, *delta):
        _check_export_shape(req)
    last = cumulative[-1]
    assert sum(_int_value(p) for p in _otlp_points(last, "extproc.requests")) == 4
    assert sum(_int_value(p) for p in _otlp_points(last, "extproc.tokens", **{"token.type": "input"})) \
        == prompt + p2
    assert sum(p.count for p in _otlp_points(last, "gen_ai.client.token.usage",
                                             **{"gen_ai.token.type": "input"})) == 4
    # delta: the exports add up to the totals, each request counted in exactly one of them
    assert sum(_int_value(p) for r in delta for p in _otlp_points(r, "extproc.requests")) == 4
    assert sum(_int_value(p) for r in delta
               for p in _otlp_points(r, "extproc.tokens", **{"token.type": "output"})) \
        == completion + c2
    assert sum(p.count for r in delta for p in _otlp_points(
        r, "gen_ai.client.token.usage", **{"gen_ai.token.type": "input"})) == 4
    assert sum(p.sum for r in delta for p in _otlp_points(
        r, "gen_ai.client.token.usage", **{"gen_ai.token.type": "input"})) == prompt + p2


def test_collections_between_scrapes_render_once() -> None:
    """Something other than a scrape collecting (a flush, or collect() called directly) leaves
    the next scrape showing only the newest values."""
    from extproc.config import Settings
    from extproc.events import UsageEvent
    from extproc.telemetry import UsageMetrics

    m = UsageMetrics.from_settings(Settings())
    assert m.prometheus is not None
    for tokens in (5, 7):
        ev = UsageEvent(metered=True, endpoint="chat", request_model="m", response_model="m",
                        http_status=200, prompt_tokens=tokens, completion_tokens=3,
                        total_tokens=tokens + 3, duration_ns=1000)
        ev.labels["team"] = TEAM
        m.emit(ev)
        assert m.provider.force_flush(1000)
        m.prometheus.reader.collect()
    body, _ = m.render_prometheus()
    text = body.decode()
    assert text.count("# HELP extproc_tokens_total ") == 1
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    assert _team_value(samples, "extproc_tokens_total", token_type="input") == 12
    assert _team_value(samples, "extproc_requests_total") == 2


def test_dashboard_cost_panels_query_the_exported_cost_counter(stack) -> None:
    """The Grafana cost panels use the name and labels the sidecar really exports for
    extproc.cost.usd (priced by the real pricing stage from the example file)."""
    from tests.test_telemetry_deploy import _dashboard, _queries, parse_promql

    _requests(stack, "u3", team="dashboards")  # its own team: the flush test counts its own
    samples = _scrape(stack)
    assert _team_value(samples, "extproc_cost_usd_total", team="dashboards") > 0
    cost_queries = [(t, e) for t, e in _queries(_dashboard()) if "cost" in e]
    assert len(cost_queries) >= 4, cost_queries
    for title, expr in cost_queries:
        metrics, labels = parse_promql(expr)
        assert metrics == {"extproc_cost_usd_total"}, (title, expr)
        exported = set().union(*(s.labels for s in samples["extproc_cost_usd_total"]))
        assert labels <= exported, f"{title}: {sorted(labels - exported)} not on the cost counter"

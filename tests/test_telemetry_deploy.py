"""Shipped configs: the Grafana dashboard only queries metrics (and labels) the sidecar really
exports, and the collector config is well formed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from opentelemetry.sdk.metrics.export import Histogram, InMemoryMetricReader, Sum
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import Settings
from extproc.events import TokenSource, UsageEvent
from extproc.stats import SidecarStats
from extproc.telemetry import UsageMetrics
from tests.telemetry_testing import FakeStorage, vllm_metrics_text

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
COLLECTOR = ROOT / "deploy" / "otel" / "collector.yaml"

# PromQL words that look like identifiers but are not metric names
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def parse_promql(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) used by a PromQL expression. Not a full parser: enough for
    the subset dashboards use (selectors, matchers, ranges, aggregations, binary operators)."""
    labels: set[str] = set()
    for _, group in _GROUPING.findall(expr):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    rest = _GROUPING.sub(" ", expr)
    for matchers in re.findall(r"\{([^}]*)\}", rest):
        labels |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    rest = re.sub(r"\{[^}]*\}", " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = re.sub(r'"[^"]*"', " ", rest)
    metrics = set()
    for m in _IDENT.finditer(rest):
        word = m.group(0)
        if word.lower() in _KEYWORDS or rest[m.end():].lstrip().startswith("("):
            continue
        metrics.add(word)
    return metrics, labels


def test_promql_extraction() -> None:
    metrics, labels = parse_promql(
        'histogram_quantile(0.9, sum by (le, team) (rate(a_bucket{x=~"$x", y!="1"}[5m]))) '
        "/ ignoring(z) group_left sum(b_total) or vector(0) * 3600"
    )
    assert metrics == {"a_bucket", "b_total"}
    assert labels == {"le", "team", "x", "y", "z"}


@dataclass
class Exposition:
    labels: dict[str, set[str]]  # Prometheus sample name -> label names
    instruments: list[tuple[str, str, str]]  # OTel (name, unit, prometheus kind)


@pytest.fixture
async def exposition() -> Exposition:
    """What a sidecar that recorded one of everything exports."""
    app = web.Application()

    async def vllm_metrics(_r: web.Request) -> web.Response:
        return web.Response(text=vllm_metrics_text(), content_type="text/plain")

    app.router.add_get("/metrics", vllm_metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    settings = Settings()
    settings.metrics.vllm_metrics_url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    stats = SidecarStats(streams_opened=5, streams_closed=4, streams_cancelled=1,
                         unmetered_requests=1, events_emitted=4)
    stats.messages["request_headers"] = 5
    stats.errors["response_body"] = 1
    stats.labels_rejected["feature"] = 1
    reader = InMemoryMetricReader()
    metrics = UsageMetrics.from_settings(settings, stats, storage=FakeStorage(),
                                         pricing=lambda ev: ev.prompt_tokens * 1e-6,
                                         extra_readers=[reader])
    metrics.guard.folded["feature"] += 1  # as after a flood
    labels = {"team": "search", "feature": "chat-ui", "env": "prod"}
    for ev in (
        UsageEvent(endpoint="chat", request_model="m", response_model="m", stream=True,
                   http_status=200, prompt_tokens=10, completion_tokens=5, cached_tokens=2,
                   token_source=TokenSource.UPSTREAM_USAGE, time_to_first_token_ns=10**7,
                   duration_ns=10**8, metered=True, labels=labels),
        UsageEvent(endpoint="embeddings", request_model="e", response_model="e", http_status=200,
                   prompt_tokens=10, token_source=TokenSource.TOKENIZER, duration_ns=10**7,
                   metered=True, labels=labels, client_aborted=True),
        UsageEvent(endpoint="chat", request_model="m", http_status=503, error="upstream_error",
                   token_source=TokenSource.NONE, duration_ns=10**7, metered=True, labels=labels),
    ):
        metrics.emit(ev)
    assert metrics.vllm is not None and await metrics.vllm.scrape_once()
    body, _ = metrics.render_prometheus()
    data = reader.get_metrics_data()
    await metrics.shutdown()
    await runner.cleanup()

    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    instruments = []
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if isinstance(m.data, Histogram):
                    kind = "histogram"
                elif isinstance(m.data, Sum) and m.data.is_monotonic:
                    kind = "counter"
                else:
                    kind = "gauge"
                instruments.append((m.name, m.unit or "", kind))
    return Exposition(out, instruments)


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def _queries(dash: dict) -> Iterator[tuple[str, str]]:
    for p in _panels(dash["panels"]):
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
            assert m, var["definition"]
            yield f"${var['name']}", f"{m.group(1)}{{{m.group(2)}!=\"\"}}"


def test_dashboard_is_valid_grafana_json() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    panels = list(_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["targets"], p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    titles = " ".join(p["title"] for p in panels)
    for needed in ("by team", "by feature", "by model", "Cost", "Time to first token",
                   "Time per output token", "queue", "Spool", "dropped", "errors"):
        assert needed.lower() in titles.lower(), needed


def test_every_dashboard_query_uses_exported_metrics_and_labels(exposition: Exposition) -> None:
    exported = exposition.labels
    seen: set[str] = set()
    for title, expr in _queries(_dashboard()):
        metrics, labels = parse_promql(expr)
        assert metrics, (title, expr)
        missing = metrics - exported.keys()
        assert not missing, f"{title}: {sorted(missing)} not exported"
        available = set().union(*(exported[m] for m in metrics)) | {"le"}
        assert labels <= available, f"{title}: labels {sorted(labels - available)} not exported"
        seen |= metrics
    # the dashboard covers each area of the sidecar's metrics
    for prefix in ("extproc_tokens", "extproc_cost", "gen_ai_server_time_to_first_token",
                   "gen_ai_server_time_per_output_token", "extproc_vllm_", "extproc_storage_",
                   "extproc_ext_proc_"):
        assert any(m.startswith(prefix) for m in seen), prefix


def collector_name(name: str, unit: str, kind: str) -> str:
    """The OTel Collector's Prometheus naming (prometheus/otlptranslator normalizeName with the
    default UnderscoreEscapingWithSuffixes), for the units we use."""
    tokens = [t for t in re.split(r"[^a-zA-Z0-9:]+", name) if t]
    main = re.sub(r"\{.*\}", "", unit)
    main = {"s": "seconds", "By": "bytes", "1": ""}.get(main, main)
    if main and main not in tokens:
        tokens.append(main)
    if kind == "counter":
        tokens = [t for t in tokens if t != "total"] + ["total"]
    if unit == "1" and kind == "gauge":
        tokens = [t for t in tokens if t != "ratio"] + ["ratio"]
    return "_".join(tokens)


def test_collector_path_gives_the_same_names(exposition: Exposition) -> None:
    """The dashboard must work whether Prometheus scrapes the sidecar or the collector."""
    assert len(exposition.instruments) > 30
    for name, unit, kind in exposition.instruments:
        expected = collector_name(name, unit, kind)
        sample = expected + "_bucket" if kind == "histogram" else expected
        assert sample in exposition.labels, (name, unit, kind, expected)


def test_collector_config() -> None:
    cfg = yaml.safe_load(COLLECTOR.read_text())
    assert set(cfg["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    pipeline = cfg["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["otlp"]
    assert "batch" in pipeline["processors"]
    assert set(pipeline["exporters"]) == {"prometheus", "clickhouse"}
    for kind in ("receivers", "processors", "exporters"):
        for name in pipeline[kind]:
            assert name in cfg[kind], f"{kind}.{name} used but not defined"
    for name in cfg["service"].get("extensions", []):
        assert name in cfg["extensions"]
    # loopback unless the operator says otherwise
    text = COLLECTOR.read_text()
    assert "0.0.0.0:" not in text

"""vLLM /metrics re-export against a tiny aiohttp server speaking vLLM's Prometheus text."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc.config import Settings
from extproc.telemetry import UsageMetrics, VllmScraper, parse_vllm_metrics
from extproc.telemetry import names as n
from tests.telemetry_testing import VLLM_MODEL, VLLM_TTFT_BUCKETS, read, vllm_metrics_text

MODEL = VLLM_MODEL
V = n.VLLM_PREFIX
TTFT_BUCKETS = VLLM_TTFT_BUCKETS


@dataclass
class FakeVllm:
    text: str = field(default_factory=vllm_metrics_text)
    status: int = 200
    delay: float = 0.0
    url: str = ""
    hits: int = 0
    hit: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, _request: web.Request) -> web.Response:
        self.hits += 1
        async with self.hit:
            self.hit.notify_all()
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(text=self.text, status=self.status,
                            content_type="text/plain", charset="utf-8")

    async def wait_hits(self, count: int, timeout: float = 10.0) -> None:
        async with self.hit:
            await asyncio.wait_for(self.hit.wait_for(lambda: self.hits >= count), timeout)


@pytest.fixture
async def vllm() -> AsyncIterator[FakeVllm]:
    fake = FakeVllm()
    app = web.Application()
    app.router.add_get("/metrics", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    yield fake
    await runner.cleanup()


def _scraper(url: str, timeout_s: float = 2.0) -> tuple[VllmScraper, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader], shutdown_on_exit=False).get_meter("t")
    return VllmScraper(url, meter, interval_s=0.05, timeout_s=timeout_s), reader


async def test_scrape_reexports_values(vllm: FakeVllm) -> None:
    scraper, reader = _scraper(vllm.url)
    assert await scraper.scrape_once()
    await scraper.stop()
    snap = read(reader)
    m = {"model_name": MODEL, "engine": "0"}
    assert snap.value(f"{V}kv_cache.usage_ratio", m) == 0.42
    assert snap.value(f"{V}requests.running", m) == 3
    assert snap.value(f"{V}requests.waiting", m) == 1
    assert snap.value(f"{V}prefix_cache.queries", m) == 1000
    assert snap.value(f"{V}prefix_cache.hits", m) == 250
    assert snap.value(f"{V}prompt_tokens", m) == 5000
    assert snap.value(f"{V}generation_tokens", m) == 700
    assert snap.value(f"{V}time_to_first_token.bucket", {**m, "le": "0.04"}) == 1
    assert snap.value(f"{V}time_to_first_token.bucket", {**m, "le": "0.5"}) == 2
    assert snap.value(f"{V}time_to_first_token.bucket", {**m, "le": "+Inf"}) == 2
    assert snap.series_count(f"{V}time_to_first_token.bucket") == len(TTFT_BUCKETS) + 1
    assert snap.value(f"{V}time_to_first_token.count", m) == 2
    assert snap.value(f"{V}time_to_first_token.sum", m) == pytest.approx(0.33)
    assert snap.value(n.VLLM_UP) == 1
    assert snap.value(n.VLLM_SCRAPE_FAILURES) == 0
    assert not any(name.startswith(f"{V}request_success") for name in snap.names())


def test_parse_accepts_older_spellings() -> None:
    text = (
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
        "# TYPE vllm:gpu_prefix_cache_queries_total counter\n"
        'vllm:gpu_prefix_cache_queries_total{model_name="m"} 10\n'
    )
    out = parse_vllm_metrics(text)
    assert out[f"{V}kv_cache.usage_ratio"] == {(("model_name", "m"),): 0.5}
    assert out[f"{V}prefix_cache.queries"] == {(("model_name", "m"),): 10.0}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_failures_are_counted_never_raised(vllm: FakeVllm) -> None:
    scraper, reader = _scraper(vllm.url, timeout_s=0.2)
    assert await scraper.scrape_once()

    vllm.status = 500
    assert not await scraper.scrape_once()
    snap = read(reader)
    assert snap.value(n.VLLM_UP) == 0 and snap.value(n.VLLM_SCRAPE_FAILURES) == 1
    assert f"{V}kv_cache.usage_ratio" not in snap.names()  # stale values are not reported

    vllm.status, vllm.text = 200, "vllm:kv_cache_usage_perc{model_name=broken 1\n"
    assert not await scraper.scrape_once()
    vllm.text = "<html>not metrics</html>"
    assert not await scraper.scrape_once()
    vllm.text, vllm.delay = vllm_metrics_text(), 0.4
    assert not await scraper.scrape_once()  # timeout
    assert scraper.failures == 4
    await scraper.stop()

    refused, _ = _scraper(f"http://127.0.0.1:{_closed_port()}/metrics")
    assert not await refused.scrape_once()
    await refused.stop()


async def test_periodic_scrape_through_usage_metrics(vllm: FakeVllm) -> None:
    settings = Settings()
    settings.metrics.vllm_metrics_url = vllm.url
    settings.metrics.vllm_scrape_interval_ms = 20
    reader = InMemoryMetricReader()
    metrics = UsageMetrics.from_settings(settings, extra_readers=[reader])
    await metrics.start()
    await vllm.wait_hits(3)
    vllm.text = vllm_metrics_text(ttft=(0.03, 0.3, 2.0))
    # Scrapes run one at a time: the next one reads the new text, and the one after it starts
    # only once that one is processed.
    await vllm.wait_hits(vllm.hits + 2)
    m = {"model_name": MODEL, "engine": "0"}
    assert read(reader).value(f"{V}time_to_first_token.count", m) == 3
    await metrics.shutdown()
    assert metrics.vllm is not None and metrics.vllm.failures == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "vllm-metrics-scrape"]  # the loop stopped

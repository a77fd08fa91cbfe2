"""The admin API's answers to bad or impossible requests: a status and a sentence, never a 500."""

from __future__ import annotations

from datetime import datetime

from aiohttp.test_utils import TestClient, TestServer

from extproc.admin import build_admin_app
from extproc.stats import SidecarStats
from extproc.storage.reports import ReportError


class _Store:
    def __init__(self, flush_ok: bool = True) -> None:
        self.calls: list[tuple] = []
        self.flushes = 0
        self.flush_ok = flush_ok

    async def report(self, name, by, *, since, until, limit, filters):  # noqa: ANN001, ANN201
        if name != "chargeback":  # what the real report function raises (extproc.storage.reports)
            raise ReportError(f"unknown report {name!r}")
        if "colour" in by:
            raise ReportError("cannot group by 'colour'")
        self.calls.append((name, by, since, until, limit, filters))
        return [{"team": "a", "requests": 1}]

    async def flush(self) -> bool:
        self.flushes += 1
        return self.flush_ok


async def _client(**kwargs) -> TestClient:  # noqa: ANN003
    client = TestClient(TestServer(build_admin_app(SidecarStats(), **kwargs), host="127.0.0.1"))
    await client.start_server()
    return client


async def test_usage_queries_are_parsed_and_bad_ones_refused():
    store = _Store()
    client = await _client(report=store.report, flush=store.flush)
    try:
        r = await client.get("/v1/usage?by=team,%20feature&since=2026-12-01T00:00:00&limit=5&team=a&fresh=false")
        assert r.status == 200 and (await r.json())["rows"] == [{"team": "a", "requests": 1}]
        assert store.calls[-1] == ("chargeback", ["team", "feature"], datetime(2026, 12, 1), None, 5, {"team": "a"})
        assert store.flushes == 0  # fresh=false: no flush first
        await client.get("/v1/usage")
        assert store.flushes == 1 and store.calls[-1][1] == ["team", "feature", "model"]

        for query, text in (("since=yesterday", "since must be an ISO 8601 time, got 'yesterday'"),
                            ("until=12/01/2026", "until must be an ISO 8601 time"),
                            ("limit=-1", "limit must be a positive integer"),
                            ("by=colour", "cannot group by 'colour'"),
                            ("report=invoices", "unknown report 'invoices'")):
            r = await client.get(f"/v1/usage?{query}")
            assert r.status == 400 and text in await r.text(), query
    finally:
        await client.close()


async def test_missing_parts_answer_404_and_a_failed_flush_503():
    store = _Store(flush_ok=False)
    client = await _client(flush=store.flush)  # no storage, no Prometheus
    try:
        r = await client.get("/v1/usage")
        assert r.status == 404 and "no storage configured" in await r.text()
        r = await client.get("/metrics")
        assert r.status == 404 and "metrics.prometheus=false" in await r.text()
        r = await client.post("/v1/flush")
        assert r.status == 503 and await r.json() == {"flushed": False}
        r = await client.get("/healthz")
        assert r.status == 200 and await r.text() == "ok\n"
    finally:
        await client.close()

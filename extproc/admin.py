"""The sidecar's HTTP admin API: health, Prometheus /metrics, usage reports, flush.

Reports go through the running sidecar because embedded ClickHouse (chDB) lets only one
process open a data directory: `extproc report` asks this API while a sidecar runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from extproc.stats import SidecarStats

log = logging.getLogger(__name__)

ReportFn = Callable[..., Awaitable[list[dict[str, Any]]]]
FlushFn = Callable[[], Awaitable[bool]]
MetricsFn = Callable[[], tuple[bytes, str]]
RepriceFn = Callable[[datetime], Awaitable[dict[str, Any]]]
# (timeout_s, min_s) -> result with drained / active_requests / seconds / detail
DrainFn = Callable[[float, float], Awaitable[Any]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS, default=str),
        status=status, content_type="application/json",
    )


def _parse_time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an ISO 8601 time, got {value!r}") from None


def build_admin_app(
    stats: SidecarStats,
    *,
    report: ReportFn | None = None,
    flush: FlushFn | None = None,
    metrics: MetricsFn | None = None,
    extra_stats: Callable[[], dict[str, Any]] | None = None,
    worker_stats: Callable[[], dict[str, Any]] | None = None,
    reprice: RepriceFn | None = None,
    ready: Callable[[], bool] | None = None,
    drain_envoy: DrainFn | None = None,
    budgets: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> web.Application:
    app = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        # liveness (/healthz) stays 200 while draining: a restart then would lose the drain
        if ready is not None and not ready():
            return web.Response(text="draining\n", status=503)
        return web.Response(text="ok\n")

    async def get_envoy_drain(request: web.Request) -> web.Response:
        if drain_envoy is None:
            raise web.HTTPNotFound(text="no Envoy drain configured\n")
        try:
            timeout_s = float(request.query.get("timeout_s", "30"))
            min_s = float(request.query.get("min_s", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="timeout_s and min_s must be numbers of seconds\n") from None
        if not (0 <= min_s <= timeout_s <= 3600):
            raise web.HTTPBadRequest(text="need 0 <= min_s <= timeout_s <= 3600\n")
        result = await drain_envoy(timeout_s, min_s)
        log.info("Envoy drain (preStop): %s after %.1f s", result.detail, result.seconds)
        return _json({"drained": result.drained, "active_requests": result.active_requests,
                      "seconds": round(result.seconds, 3), "detail": result.detail},
                     200 if result.drained else 504)

    async def get_metrics(_: web.Request) -> web.Response:
        if metrics is None:
            raise web.HTTPNotFound(text="Prometheus endpoint disabled (metrics.prometheus=false, "
                                         "OTEL_METRICS_EXPORTER without prometheus, or OTEL_SDK_DISABLED=true)\n")
        body, content_type = metrics()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def get_stats(_: web.Request) -> web.Response:
        data: dict[str, Any] = stats.snapshot()
        if extra_stats is not None:
            data["storage"] = extra_stats()
        if worker_stats is not None:
            data["workers"] = worker_stats()
        return _json(data)

    async def post_flush(_: web.Request) -> web.Response:
        ok = await flush() if flush is not None else True
        return _json({"flushed": ok}, 200 if ok else 503)

    async def get_usage(request: web.Request) -> web.Response:
        if report is None:
            raise web.HTTPNotFound(text="no storage configured\n")
        q = request.query
        # Any other query parameter filters by that dimension (validated by the report).
        reserved = {"report", "by", "since", "until", "limit", "fresh"}
        filters = {k: v for k, v in q.items() if k not in reserved}
        by = [b.strip() for b in q.get("by", "team,feature,model").split(",") if b.strip()]
        limit = q.get("limit")
        if limit is not None and not limit.isdigit():
            raise web.HTTPBadRequest(text="limit must be a positive integer\n")
        if q.get("fresh", "true").lower() != "false" and flush is not None:
            await flush()
        try:
            rows = await report(
                q.get("report", "chargeback"), by,
                since=_parse_time(q.get("since"), "since"), until=_parse_time(q.get("until"), "until"),
                limit=int(limit) if limit else None, filters=filters or None,
            )
        except (ValueError, KeyError) as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        return _json({"report": q.get("report", "chargeback"), "by": by, "rows": rows})

    async def post_reprice(request: web.Request) -> web.Response:
        if reprice is None:
            raise web.HTTPNotFound(text="no storage configured\n")
        since = _parse_time(request.query.get("since"), "since")
        if since is None:
            raise web.HTTPBadRequest(text="since is required (ISO 8601): re-price events from then on\n")
        try:
            result = await reprice(since)
        except ValueError as exc:  # a bad pricing file (PricingError), expired raw events
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        return _json(result)

    async def get_budgets(_: web.Request) -> web.Response:
        if budgets is None:
            raise web.HTTPNotFound(text="no policy file configured (policy.file / --policy)\n")
        return _json(await budgets())

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/envoy/drain", get_envoy_drain)
    app.router.add_get("/v1/budgets", get_budgets)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/v1/stats", get_stats)
    app.router.add_post("/v1/flush", post_flush)
    app.router.add_get("/v1/usage", get_usage)
    app.router.add_post("/v1/reprice", post_reprice)
    return app


async def start_admin(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port
    return runner, bound

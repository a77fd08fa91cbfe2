"""The Envoy drain behind the Envoy container's preStop hook, against a stand-in Envoy admin API on
127.0.0.1 (the real Envoy path is in test_k8s_pod_lifecycle.py): each way it can end, the admin
route's answers, the sidecar's readiness while draining and its wait for Envoy's connections."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from extproc.admin import build_admin_app, start_admin
from extproc.app import Sidecar
from extproc.config import ConfigError, Settings, load_settings
from extproc.devtools.devstack import free_port
from extproc.envoy_drain import DrainResult, active_requests, drain_envoy
from extproc.stats import SidecarStats


def _stats(active: int, admin_active: int = 1) -> dict:
    return {"stats": [
        {"name": "http.ingress.downstream_rq_active", "value": active},
        {"name": "http.admin.downstream_rq_active", "value": admin_active},  # the /stats request itself
        {"name": "listener.admin.downstream_cx_active", "value": 1},
    ]}


class FakeEnvoyAdmin:
    def __init__(self, actives: list[int], *, fail_status: int = 200, stats_body: bytes | None = None,
                 exit_on_stats: bool = False) -> None:
        self.actives = actives
        self.exit_on_stats = exit_on_stats
        self.fail_status = fail_status
        self.stats_body = stats_body
        self.calls: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _post(self, request: web.Request) -> web.Response:
        self.calls.append(request.path_qs)
        status = self.fail_status if request.path == "/healthcheck/fail" else 200
        return web.Response(text="OK\n", status=status)

    async def _stats(self, request: web.Request) -> web.Response:
        self.calls.append(request.path)
        if self.exit_on_stats:  # the process is gone: the connection drops without an answer
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError
        if self.stats_body is not None:
            return web.Response(body=self.stats_body, content_type="application/json")
        active = self.actives.pop(0) if len(self.actives) > 1 else self.actives[0]
        return web.json_response(_stats(active))

    async def __aenter__(self) -> FakeEnvoyAdmin:
        app = web.Application()
        app.router.add_post("/healthcheck/fail", self._post)
        app.router.add_post("/drain_listeners", self._post)
        app.router.add_get("/stats", self._stats)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def test_active_requests_counts_listeners_only() -> None:
    assert active_requests(_stats(3, admin_active=5)) == 3
    assert active_requests({"stats": [{"name": "http.a.downstream_rq_active", "value": 1},
                                      {"name": "http.b.downstream_rq_active", "value": 2}]}) == 3
    assert active_requests({}) == 0
    assert active_requests({"stats": ["junk", {"name": "cluster.x.downstream_rq_active", "value": 9}]}) == 0


async def test_drains_until_no_request_is_active() -> None:
    async with FakeEnvoyAdmin([2, 1, 0]) as envoy:
        result = await drain_envoy(envoy.url, timeout_s=10, poll_s=0.01)
    assert result.drained and result.active_requests == 0
    # health check failed first (readiness false), then the graceful drain, then the waiting
    assert envoy.calls[:2] == ["/healthcheck/fail", "/drain_listeners?graceful"]
    assert envoy.calls[2:] == ["/stats"] * 3


async def test_waits_at_least_min_s() -> None:
    async with FakeEnvoyAdmin([0]) as envoy:
        result = await drain_envoy(envoy.url, timeout_s=10, min_s=0.2, poll_s=0.01)
    assert result.drained and result.seconds >= 0.2


async def test_gives_up_after_the_timeout_with_the_count() -> None:
    async with FakeEnvoyAdmin([3]) as envoy:
        result = await drain_envoy(envoy.url, timeout_s=0.1, poll_s=0.01)
    assert not result.drained and result.active_requests == 3
    assert "3 requests still active" in result.detail


async def test_envoy_already_gone_counts_as_drained() -> None:
    result = await drain_envoy(f"http://127.0.0.1:{free_port()}", timeout_s=1)
    assert result.drained and "unreachable" in result.detail


async def test_envoy_refusing_the_health_check_fail_is_reported() -> None:
    async with FakeEnvoyAdmin([0], fail_status=503) as envoy:
        result = await drain_envoy(envoy.url, timeout_s=1)
    assert not result.drained and "HTTP 503" in result.detail
    assert envoy.calls == ["/healthcheck/fail"]  # no drain started on a half-working admin


async def test_unreadable_stats_are_reported() -> None:
    async with FakeEnvoyAdmin([0], stats_body=b"not json") as envoy:
        result = await drain_envoy(envoy.url, timeout_s=1)
    assert not result.drained and "not understood" in result.detail


async def test_envoy_exiting_while_draining_counts_as_drained() -> None:
    async with FakeEnvoyAdmin([1], exit_on_stats=True) as envoy:
        result = await drain_envoy(envoy.url, timeout_s=5, poll_s=0.01)
    assert result.drained and "exited" in result.detail
    assert envoy.calls[-1] == "/stats"


# --- the admin route and readiness -------------------------------------------------------
@pytest.fixture
async def admin() -> AsyncIterator[tuple[str, dict]]:
    state = {"ready": True, "result": DrainResult(True, 0, 0.5, "no active requests"), "calls": []}

    async def drain(timeout_s: float, min_s: float) -> DrainResult:
        state["calls"].append((timeout_s, min_s))
        return state["result"]

    app = build_admin_app(SidecarStats(), ready=lambda: state["ready"], drain_envoy=drain)
    runner, port = await start_admin(app, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}", state
    await runner.cleanup()


async def test_readyz_fails_while_draining_and_healthz_stays(admin) -> None:
    url, state = admin
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/readyz") as r:
            assert r.status == 200
        state["ready"] = False
        async with http.get(url + "/readyz") as r:
            assert r.status == 503 and await r.text() == "draining\n"
        async with http.get(url + "/healthz") as r:
            assert r.status == 200  # liveness must not restart a draining sidecar


async def test_drain_route(admin) -> None:
    url, state = admin
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/v1/envoy/drain?timeout_s=40&min_s=3") as r:
            assert r.status == 200
            assert await r.json() == {"drained": True, "active_requests": 0, "seconds": 0.5,
                                      "detail": "no active requests"}
        assert state["calls"] == [(40.0, 3.0)]
        async with http.get(url + "/v1/envoy/drain") as r:
            assert r.status == 200
        assert state["calls"][-1] == (30.0, 0.0)
        state["result"] = DrainResult(False, 2, 40.0, "2 requests still active after 40 s")
        async with http.get(url + "/v1/envoy/drain") as r:
            assert r.status == 504 and (await r.json())["active_requests"] == 2
        for bad in ("timeout_s=x", "timeout_s=5&min_s=6", "timeout_s=-1", "timeout_s=99999"):
            async with http.get(url + "/v1/envoy/drain?" + bad) as r:
                assert r.status == 400, bad
                assert "timeout_s" in await r.text()


async def test_drain_route_without_a_drain_is_404() -> None:
    runner, port = await start_admin(build_admin_app(SidecarStats()), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/v1/envoy/drain") as r:
            assert r.status == 404
    finally:
        await runner.cleanup()


# --- the sidecar's wait for Envoy's connections -------------------------------------------
async def test_wait_returns_once_connections_are_gone(caplog) -> None:
    side = Sidecar(Settings())
    counts = [2, 1, 0]
    side.open_connections = lambda: counts.pop(0) if len(counts) > 1 else counts[0]  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="extproc.app"):
        assert await side.wait_for_envoy_to_leave(10) is True
    assert counts == [0]  # it looked until the count reached 0
    assert "Envoy's connections are closed" in caplog.text  # what the operator reads at shutdown


async def test_wait_gives_up_after_the_timeout(caplog) -> None:
    side = Sidecar(Settings())
    side.open_connections = lambda: 3  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="extproc.app"):
        assert await side.wait_for_envoy_to_leave(0.1) is False
    assert "still connected" in caplog.text and "3 connections" in caplog.text  # the operator's warning


async def test_wait_without_a_connection_count_uses_streams(caplog) -> None:
    settings = Settings()
    settings.grpc.transport = "grpcio"
    side = Sidecar(settings)
    assert side.open_connections() is None
    side.stats.streams_opened, side.stats.streams_closed = 5, 4
    with caplog.at_level(logging.WARNING, logger="extproc.app"):
        assert await side.wait_for_envoy_to_leave(0.1) is False
    assert "still connected" in caplog.text
    side.stats.streams_closed = 5
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="extproc.app"):
        assert await side.wait_for_envoy_to_leave(10) is True
    assert "Envoy's connections are closed" in caplog.text


def test_drain_timeout_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="drain_timeout_ms"):
        load_settings(None, {"grpc": {"drain_timeout_ms": -1}}, environ={})
    assert load_settings(None, {"grpc": {"drain_timeout_ms": 20000}}, environ={}).grpc.drain_timeout_ms == 20000

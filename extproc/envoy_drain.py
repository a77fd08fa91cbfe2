"""Drain the Envoy in front of this sidecar through its admin API, for the Envoy container's
preStop hook (GET /v1/envoy/drain on the sidecar's admin port: a preStop hook can only send a
GET, the Envoy image has no HTTP client, and Envoy's admin stays on loopback).

Order: fail Envoy's health check (its readiness probe turns false), start a graceful drain
(connections are told to close: HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY), then wait until
no downstream request is active. Kubernetes sends SIGTERM to Envoy once this returns.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

ACTIVE_STAT = "downstream_rq_active"


@dataclass
class DrainResult:
    drained: bool
    active_requests: int
    seconds: float
    detail: str


def active_requests(stats: dict) -> int:
    """Sum of the listeners' active downstream requests in /stats?format=json; the admin
    listener's own (http.admin.*: this very /stats request) does not count."""
    return sum(int(s.get("value", 0)) for s in stats.get("stats", ())
               if isinstance(s, dict) and str(s.get("name", "")).endswith("." + ACTIVE_STAT)
               and str(s.get("name", "")).startswith("http.")
               and not str(s.get("name", "")).startswith("http.admin."))


async def drain_envoy(admin_url: str, *, timeout_s: float, min_s: float = 0.0,
                      poll_s: float = 0.1) -> DrainResult:
    base = admin_url.rstrip("/")
    start = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            for path in ("/healthcheck/fail", "/drain_listeners?graceful"):
                async with http.post(base + path) as resp:
                    if resp.status != 200:
                        return DrainResult(False, -1, time.monotonic() - start,
                                           f"Envoy admin {path}: HTTP {resp.status}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # Envoy already gone: nothing left to drain
            return DrainResult(True, 0, time.monotonic() - start, f"Envoy admin unreachable ({exc!r})")
        active = -1
        while True:
            elapsed = time.monotonic() - start
            try:
                async with http.get(f"{base}/stats?format=json&filter={ACTIVE_STAT}") as resp:
                    active = active_requests(await resp.json(content_type=None))
            except (TimeoutError, aiohttp.ClientError, OSError):
                return DrainResult(True, 0, elapsed, "Envoy exited while draining")
            except ValueError as exc:
                return DrainResult(False, active, elapsed, f"Envoy /stats answer not understood ({exc})")
            if active == 0 and elapsed >= min_s:
                return DrainResult(True, 0, elapsed, "no active requests")
            if elapsed >= timeout_s:
                return DrainResult(False, active, elapsed, f"{active} requests still active after {timeout_s:g} s")
            await asyncio.sleep(poll_s)

"""The h2 transport behind the real Envoy: token counts must match the upstream's and Envoy must
see no failed ext_proc streams, in both modes and over TCP and a Unix socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from extproc.config import AttributionSettings
from extproc.devtools.devstack import envoy_process, free_port
from extproc.devtools.envoy_config import EnvoyOptions
from extproc.events import TokenSource, UsageEvent
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.server import ExtProcService
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry
from extproc.transport import start_h2_server
from tests.stack import envoy_stats

pytestmark = pytest.mark.timeout(60)


class ListSink:
    def __init__(self) -> None:
        self.events: list[UsageEvent] = []
        self.expected = 0
        self.all_in = asyncio.Event()

    def emit(self, event: UsageEvent) -> None:
        self.events.append(event)
        if len(self.events) >= self.expected:
            self.all_in.set()


def _chunk(**fields: Any) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m", **fields}) + b"\n\n"


async def upstream(request: web.Request) -> web.StreamResponse:
    """vLLM-shaped: the prompt says how many chunks to stream; usage is derived from it."""
    body = await request.json()
    prompt = body["messages"][0]["content"]
    n = int(prompt.split()[0])
    usage = {"prompt_tokens": len(prompt) // 100 + 7, "completion_tokens": n, "total_tokens": len(prompt) // 100 + 7 + n}
    if not body.get("stream"):
        return web.json_response({"id": "c", "object": "chat.completion", "model": "m", "usage": usage,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "w " * n},
                                               "finish_reason": "stop"}]})
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(n):
        await resp.write(_chunk(choices=[{"index": 0, "delta": {"content": f"w{i} "},
                                          "finish_reason": "stop" if i == n - 1 else None}]))
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(_chunk(choices=[], usage=usage))
    await resp.write(b"data: [DONE]\n\n")
    return resp


@pytest.mark.parametrize("mode,via", [("sync", "tcp"), ("observe", "unix"), ("observe", "tcp")])
async def test_envoy_end_to_end(tmp_path: Path, mode: str, via: str):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream)
    runner = web.AppRunner(app)
    await runner.setup()
    up_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()

    stats, sink = SidecarStats(), ListSink()
    service = ExtProcService(Attribution(AttributionSettings(), stats), ProcessorContext(TokenizerRegistry()),
                             [sink], stats)
    listen = f"unix:{tmp_path / 'x.sock'}" if via == "unix" else "127.0.0.1:0"
    server, port = await start_h2_server(service.open_stream, listen)
    address = listen if via == "unix" else f"127.0.0.1:{port}"
    listen_port, admin_port = free_port(), free_port()
    envoy = envoy_process(EnvoyOptions(upstream=f"http://127.0.0.1:{up_port}", listen_port=listen_port,
                                       admin_port=admin_port, extproc_address=address, mode=mode), tmp_path)
    await asyncio.to_thread(envoy.start)
    # (chunks, prompt bytes, stream): small, long SSE, a 300 KB prompt (request_body message
    # larger than any default HTTP/2 window), non-streaming
    cases = [(3 + i % 7, 50, True) for i in range(40)] + [(1500, 50, True), (20, 300_000, True),
                                                           (5, 80_000, False), (4, 50, False)]
    expected = []
    sink.expected = len(cases)
    try:
        async with aiohttp.ClientSession() as http:
            sem = asyncio.Semaphore(10)

            async def one(n: int, size: int, stream: bool) -> None:
                prompt = f"{n} " + "p" * size
                expected.append((len(prompt) // 100 + 7, n))
                req = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": stream}
                if stream:
                    req["stream_options"] = {"include_usage": True}
                async with sem, http.post(f"http://127.0.0.1:{listen_port}/v1/chat/completions", json=req,
                                          headers={"x-team": "t1"}) as r:
                    assert r.status == 200
                    text = await r.text()
                if stream:
                    assert text.count('"content":') == n and text.endswith("data: [DONE]\n\n")
                else:
                    assert json.loads(text)["usage"]["completion_tokens"] == n

            await asyncio.gather(*(one(*c) for c in cases))
        # observe mode: events land when Envoy's last message arrives, after the client's answer
        await asyncio.wait_for(sink.all_in.wait(), 10)
        got = sorted((e.prompt_tokens, e.completion_tokens) for e in sink.events)
        assert got == sorted(expected)
        assert all(e.token_source == TokenSource.UPSTREAM_USAGE and not e.error and not e.client_aborted
                   for e in sink.events)
        assert all(dict(e.labels)["team"] == "t1" for e in sink.events)
        assert stats.streams_cancelled == 0 and not stats.errors
        envoy_counts = envoy_stats(admin_port)
        assert envoy_counts["http.ingress.ext_proc.streams_started"] == len(cases)
        for bad in ("streams_failed", "failure_mode_allowed", "message_timeouts", "spurious_msgs_received",
                    "http_not_ok_resp_received"):
            assert envoy_counts[f"http.ingress.ext_proc.{bad}"] == 0, (bad, envoy_counts)
        if mode == "sync":
            assert envoy_counts["http.ingress.ext_proc.stream_msgs_sent"] == \
                envoy_counts["http.ingress.ext_proc.stream_msgs_received"]
        # graceful stop with Envoy still connected: GOAWAY is accepted, nothing fails
        await server.stop(2)
        assert not server.connections
    finally:
        await asyncio.to_thread(envoy.stop)
        await server.stop(0)
        await runner.cleanup()

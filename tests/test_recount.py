"""vLLM's /tokenize (here the simulator's, which counts as vLLM does) recounts, off the hot
path, the events the sidecar could only estimate; the event waits for the answer or a timeout
and is never lost. Messages in the shipped shape (response headers skipped, response.code on
the first body message)."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import orjson
import pytest
from aiohttp import web

from extproc.config import AttributionSettings, ConfigError, load_settings
from extproc.devtools.devstack import free_port
from extproc.devtools.sim.generation import encode
from extproc.events import TokenSource
from extproc.labels import Attribution
from extproc.processors import ProcessorContext
from extproc.recount import TOKENIZER_NAME, Recounter
from extproc.server import ExtProcService
from extproc.stats import SidecarStats
from extproc.tokenizers import TokenizerRegistry
from tests import ext_proc_msgs as m
from tests.stack import RecordingSink

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does a meter do?"}]


def _service(url: str, **kw) -> tuple[ExtProcService, RecordingSink, Recounter]:  # noqa: ANN003
    stats, rec = SidecarStats(), RecordingSink()
    service = ExtProcService(Attribution(AttributionSettings(), stats), ProcessorContext(TokenizerRegistry()),
                             [rec], stats)
    service.recounter = Recounter(url, service._emit, stats, **kw)
    return service, rec, service.recounter


def _aborted(service: ExtProcService, path: str, request: dict, chunks: list[bytes]) -> None:
    s = service.open_stream()
    s.on_message(m.request_headers(path))
    s.on_message(m.body(orjson.dumps({**request, "stream": True}), eos=True))
    for i, c in enumerate(chunks):
        s.on_message(m.body(m.sse(c), response=True, code=200 if i == 0 else None))
    s.close()  # Envoy reset the stream: the client went away


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _chat_chunk(text: str, **delta) -> bytes:  # noqa: ANN003
    return orjson.dumps({"model": MODEL, "choices": [{"index": 0, "delta": {"content": text, **delta}}]})


async def test_an_estimated_chat_is_recounted_by_tokenize(sim):
    want = _post(f"{sim}/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
    service, rec, recounter = _service(sim, timeout_s=10)
    _aborted(service, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES},
             [_chat_chunk("A meter"), _chat_chunk(" counts café", reasoning=None)])
    assert not rec.events and recounter.in_flight == 1  # waits for the answer, off the stream
    await recounter.close()
    (ev,) = rec.events
    assert ev.prompt_tokens == want["usage"]["prompt_tokens"]
    assert ev.completion_tokens == len(encode("A meter counts café"))
    assert ev.total_tokens == ev.prompt_tokens + ev.completion_tokens
    assert (ev.token_source, ev.tokenizer, ev.client_aborted) == (TokenSource.TOKENIZER, TOKENIZER_NAME, True)
    assert service.stats.tokenize_recounted == 1 and service.stats.events_emitted == 1


async def test_an_estimated_completion_is_recounted_by_tokenize(sim):
    prompts = ["Once upon a time", "A ledger of GPUs"]
    want = _post(f"{sim}/v1/completions", {"model": MODEL, "prompt": prompts, "max_tokens": 2})
    service, rec, recounter = _service(sim, timeout_s=10)
    chunk = orjson.dumps({"model": MODEL, "choices": [{"index": 0, "text": " there"}, {"index": 1, "text": " was"}]})
    _aborted(service, "/v1/completions", {"model": MODEL, "prompt": prompts}, [chunk])
    await recounter.close()
    (ev,) = rec.events
    assert ev.prompt_tokens == want["usage"]["prompt_tokens"]
    assert ev.completion_tokens == len(encode(" there")) + len(encode(" was"))
    assert ev.token_source == TokenSource.TOKENIZER


async def _server(handler) -> tuple[web.AppRunner, str]:  # noqa: ANN001
    app = web.Application()
    app.router.add_post("/tokenize", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_no_answer_in_time_leaves_the_estimate_and_the_event():
    release = asyncio.Event()
    asked = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        asked.set()
        await release.wait()
        return web.json_response({"count": 1})

    runner, url = await _server(hang)
    try:
        service, rec, recounter = _service(url, timeout_s=0.2)
        _aborted(service, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, [_chat_chunk("Hi")])
        await asyncio.wait_for(asked.wait(), 30)
        await recounter.close()  # bounded by the timeout
        (ev,) = rec.events
        assert ev.token_source == TokenSource.TOKENIZER_ESTIMATE and ev.prompt_tokens > 0
        assert service.stats.tokenize_failed == 1
    finally:
        release.set()
        await runner.cleanup()


async def test_tokenize_down_or_refusing_leaves_the_estimate(caplog):
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no"}}, status=404)

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=b"[1, 2]", content_type="application/json")

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens
    for handler in (None, refuse, garbage):
        runner, url = await _server(handler) if handler else (None, down)
        try:
            service, rec, recounter = _service(url, timeout_s=5)
            _aborted(service, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, [_chat_chunk("Hi")])
            await recounter.close()
            (ev,) = rec.events
            assert ev.token_source == TokenSource.TOKENIZER_ESTIMATE and service.stats.tokenize_failed == 1
        finally:
            if runner is not None:
                await runner.cleanup()
    assert "gave no count" in caplog.text


async def test_past_the_in_flight_bound_events_go_on_at_once():
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"count": 1})

    runner, url = await _server(hang)
    try:
        service, rec, recounter = _service(url, timeout_s=5, max_in_flight=1)
        for _ in range(3):
            _aborted(service, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, [_chat_chunk("Hi")])
        assert len(rec.events) == 2 and service.stats.tokenize_overflow == 2
        release.set()
        await recounter.close()
        assert len(rec.events) == 3 and rec.events[-1].token_source == TokenSource.TOKENIZER
    finally:
        release.set()
        await runner.cleanup()


async def test_events_with_usage_or_an_exact_count_never_ask():
    asked = []

    async def count(request: web.Request) -> web.Response:
        asked.append(await request.json())
        return web.json_response({"count": 1})

    runner, url = await _server(count)
    try:
        service, rec, recounter = _service(url, timeout_s=5)
        usage = orjson.dumps({"model": MODEL, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1,
                                                                       "total_tokens": 4}})
        _aborted(service, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, [_chat_chunk("Hi"), usage])
        service._ctx = ProcessorContext(TokenizerRegistry(models={MODEL: "llama3"}))  # template: exact
        _aborted(service, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, [_chat_chunk("Hi")])
        await recounter.close()
        assert [e.token_source for e in rec.events] == [TokenSource.UPSTREAM_USAGE, TokenSource.TOKENIZER]
        assert not asked and recounter.in_flight == 0
    finally:
        await runner.cleanup()


def test_tokenize_settings_are_checked():
    s = load_settings(None, {"tokenizer": {"tokenize_url": "http://vllm:8000"}}, environ={})
    assert (s.tokenizer.tokenize_url, s.tokenizer.tokenize_timeout_ms) == ("http://vllm:8000", 500)
    with pytest.raises(ConfigError, match="tokenize_url"):
        load_settings(None, {"tokenizer": {"tokenize_url": "vllm:8000"}}, environ={})
    with pytest.raises(ConfigError, match="tokenize_timeout_ms"):
        load_settings(None, {"tokenizer": {"tokenize_timeout_ms": 0}}, environ={})

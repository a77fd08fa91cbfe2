"""The vLLM simulator, driven by the official openai client and raw aiohttp."""

from __future__ import annotations

import base64
import math
import re
import time
from array import array
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from extproc.devtools.sim import SimConfig, SimHandle, start_sim
from extproc.devtools.sim import generation as gen

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Explain token metering in one paragraph, please."},
]


def prompt_len(messages: list[dict[str, Any]]) -> int:
    return len(gen.encode(gen.render_chat_prompt(messages)))


def completion_len(text: str, finish_reason: str) -> int:
    """Tokens of the returned text, plus the EOS vLLM counts for a stop finish."""
    return len(gen.encode(text)) + (finish_reason == "stop")


@pytest.fixture
async def sim() -> AsyncIterator[SimHandle]:
    handle = await start_sim(SimConfig(port=0))
    yield handle
    await handle.close()


def client(handle: SimHandle) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0)


async def raw_sse(handle: SimHandle, path: str, body: dict[str, Any],
                  headers: dict[str, str] | None = None) -> list[Any]:
    async with aiohttp.ClientSession() as s, s.post(handle.url + path, json=body, headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        text = await r.text()
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e == "data: [DONE]" else orjson.loads(e[6:]) for e in events]


async def metric(handle: SimHandle, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(handle.url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    m = re.search(rf"^{re.escape(name)}(?:[{{,][^ ]*)? (\S+)$", text, re.M)  # name may carry some labels
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


# ---- chat streaming --------------------------------------------------------------------

async def test_chat_stream_without_usage_has_no_usage(sim: SimHandle) -> None:
    events = await raw_sse(sim, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "stream": True})
    chunks = events[:-1]
    assert events[-1] == "[DONE]"
    assert all("usage" not in c for c in chunks)  # vLLM omits unset fields, not "usage": null
    first = chunks[0]
    assert first["object"] == "chat.completion.chunk" and first["model"] == MODEL
    assert first["id"].startswith("chatcmpl-")
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] in ("stop", "length") and last["stop_reason"] is None
    assert len({c["id"] for c in chunks}) == 1


async def test_chat_stream_include_usage_matches_retokenizing(sim: SimHandle) -> None:
    async with client(sim) as c:
        stream = await c.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert all(ch.usage is None for ch in chunks[:-1])
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    finish = chunks[-2].choices[0].finish_reason
    token_chunks = len(chunks) - 2  # minus the role chunk and the usage chunk: one chunk per token
    assert final.usage.prompt_tokens == prompt_len(MESSAGES)
    assert final.usage.completion_tokens == token_chunks == completion_len(text, finish)
    assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens


async def test_continuous_usage_is_cumulative_per_chunk(sim: SimHandle) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = await raw_sse(sim, "/v1/chat/completions", body)
    chunks, final = events[:-2], events[-2]
    plen = prompt_len(MESSAGES)
    seen = [c["usage"]["completion_tokens"] for c in chunks]
    assert seen == list(range(len(chunks)))  # role chunk 0, then +1 per token: running, not deltas
    assert all(c["usage"]["prompt_tokens"] == plen for c in chunks)
    assert all(c["usage"]["total_tokens"] == plen + c["usage"]["completion_tokens"] for c in chunks)
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == seen[-1]


async def test_continuous_usage_without_include_usage_is_ignored(sim: SimHandle) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": False, "continuous_usage_stats": True}}
    events = await raw_sse(sim, "/v1/chat/completions", body)
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"]  # no usage chunk


async def test_empty_stream_options_defaults_include_usage_true(sim: SimHandle) -> None:
    events = await raw_sse(sim, "/v1/chat/completions",
                           {"model": MODEL, "messages": MESSAGES, "stream": True, "stream_options": {}})
    assert events[-2]["choices"] == [] and events[-2]["usage"]["prompt_tokens"] == prompt_len(MESSAGES)


async def test_chat_n2_stream_interleaves_and_sums(sim: SimHandle) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "n": 2, "max_tokens": 200,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = await raw_sse(sim, "/v1/chat/completions", body)
    chunks, final = events[:-2], events[-2]
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]  # a role chunk per choice
    assert [c["choices"][0]["index"] for c in chunks[2:4]] == [0, 1]  # then token by token, interleaved
    texts, counts, finishes = {0: "", 1: ""}, {0: 0, 1: 0}, {}
    for c in chunks:
        ch = c["choices"][0]
        texts[ch["index"]] += ch["delta"].get("content", "")
        counts[ch["index"]] = c["usage"]["completion_tokens"]  # continuous usage is per choice
        if ch["finish_reason"]:
            finishes[ch["index"]] = ch["finish_reason"]
    assert texts[0] != texts[1]
    assert finishes == {0: "stop", 1: "stop"}
    for i in (0, 1):
        assert counts[i] == completion_len(texts[i], "stop")
    assert final["usage"]["completion_tokens"] == counts[0] + counts[1]
    assert final["usage"]["prompt_tokens"] == prompt_len(MESSAGES)  # the prompt counts once


async def test_chat_n2_non_stream(sim: SimHandle) -> None:
    async with client(sim) as c:
        r = await c.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_completion_tokens=3)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.object == "chat.completion" and r.model == MODEL
    assert all(ch.finish_reason == "length" for ch in r.choices)  # a sentence is > 3 tokens
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == prompt_len(MESSAGES)
    assert r.usage.prompt_tokens_details is None


async def test_non_stream_usage_matches_retokenizing(sim: SimHandle) -> None:
    async with client(sim) as c:
        for i in range(5):
            messages = [{"role": "user", "content": f"Question number {i}?"}]
            r = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=500)
            ch = r.choices[0]
            assert ch.finish_reason == "stop"
            assert r.usage.prompt_tokens == prompt_len(messages)
            assert r.usage.completion_tokens == completion_len(ch.message.content, "stop")


async def test_output_is_deterministic_and_utf8(sim: SimHandle) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 500}
    runs = []
    empty_mid_stream = 0
    non_ascii = ""
    for seed in range(6):
        events = await raw_sse(sim, "/v1/chat/completions", {**body, "seed": seed})
        deltas = [e["choices"][0]["delta"].get("content", "") for e in events[1:-1]]
        text = "".join(deltas)
        text.encode("utf-8")  # every delta is whole characters: no lone surrogates
        assert "\ufffd" not in text
        empty_mid_stream += sum(1 for d in deltas[:-1] if d == "")  # token ending mid-character
        non_ascii += "".join(ch for ch in text if ord(ch) > 127)
        runs.append(text)
    again = await raw_sse(sim, "/v1/chat/completions", {**body, "seed": 0})
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in again[1:-1]) == runs[0]
    assert len(set(runs)) == len(runs)  # the seed changes the text
    assert empty_mid_stream > 0
    assert any(ord(ch) > 0xFFFF for ch in non_ascii)  # 4-byte UTF-8 (emoji)


# ---- completions and embeddings ---------------------------------------------------------

async def test_completions_prompt_forms(sim: SimHandle) -> None:
    async with client(sim) as c:
        r = await c.completions.create(model=MODEL, prompt="Once upon a time")
        assert r.object == "text_completion" and r.id.startswith("cmpl-")
        assert r.usage.prompt_tokens == 1 + len(gen.encode("Once upon a time"))  # BOS
        assert r.usage.completion_tokens == 16  # CompletionRequest.max_tokens defaults to 16
        assert r.choices[0].finish_reason == "length"

        r = await c.completions.create(model=MODEL, prompt=["a", "b c"], n=2, max_tokens=300)
        assert [ch.index for ch in r.choices] == [0, 1, 2, 3]  # prompt-major, like vLLM
        assert r.usage.prompt_tokens == 2 + 3
        assert r.usage.completion_tokens == sum(completion_len(ch.text, ch.finish_reason) for ch in r.choices)

        r = await c.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=5)
        assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 5


async def test_completions_stream_usage(sim: SimHandle) -> None:
    body = {"model": MODEL, "prompt": ["x", "y z"], "stream": True, "max_tokens": 7,
            "stream_options": {"include_usage": True}}
    events = await raw_sse(sim, "/v1/completions", body)
    chunks, final = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" and "text" in c["choices"][0] for c in chunks)
    assert len(chunks) == 14  # one chunk per token, 2 prompts x 7 tokens
    assert final == {"id": chunks[0]["id"], "object": "text_completion", "created": chunks[0]["created"],
                     "model": MODEL, "choices": [],
                     "usage": {"prompt_tokens": 2 + 3, "total_tokens": 19, "completion_tokens": 14}}


async def test_embeddings(sim: SimHandle) -> None:
    async with client(sim) as c:
        r = await c.embeddings.create(model=MODEL, input=["hello world", "café ☕"])  # base64 on the wire
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == 4096 for d in r.data)
    assert math.isclose(sum(v * v for v in r.data[0].embedding), 1.0, rel_tol=1e-4)
    assert r.usage.prompt_tokens == r.usage.total_tokens == 2 + len(gen.encode("hello world")) + len(gen.encode("café ☕"))

    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "input": [[5, 6, 7]], "encoding_format": "float"}
        async with s.post(sim.url + "/v1/embeddings", json=body) as resp:
            data = await resp.json()
        b64 = {**body, "encoding_format": "base64"}
        async with s.post(sim.url + "/v1/embeddings", json=b64) as resp:
            packed = (await resp.json())["data"][0]["embedding"]
    assert data["object"] == "list" and data["id"].startswith("embd-")
    assert data["usage"] == {"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0,
                             "prompt_tokens_details": None}
    floats = array("f", base64.b64decode(packed)).tolist()
    assert floats == pytest.approx(data["data"][0]["embedding"], rel=1e-6)


# ---- errors and fault hooks -------------------------------------------------------------

async def test_unknown_model_is_404(sim: SimHandle) -> None:
    async with client(sim) as c:
        with pytest.raises(openai.NotFoundError) as info:
            await c.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert info.value.status_code == 404
    assert info.value.body == {"message": "The model `gpt-9` does not exist.", "type": "NotFoundError",
                               "param": "model", "code": 404}


async def test_bad_requests_are_400(sim: SimHandle) -> None:
    url = sim.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b'{"model": ', headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            err = (await r.json())["error"]
            assert err["code"] == 400 and err["type"] == "Bad Request" and "json_invalid" in err["message"]
        async with s.post(url, json={"model": MODEL}) as r:
            err = (await r.json())["error"]
            assert r.status == 400 and err["param"] == "body.messages" and "Field required" in err["message"]
        async with s.post(url, json={"messages": MESSAGES, "stream_options": {"include_usage": True}}) as r:
            err = (await r.json())["error"]
            assert r.status == 400 and err["param"] == "stream_options"
        async with s.post(url, json={"messages": MESSAGES, "max_tokens": 131_072}) as r:
            err = (await r.json())["error"]
            assert r.status == 400 and err["type"] == "BadRequestError" and err["param"] == "max_tokens"
            assert "maximum context length is 131072 tokens" in err["message"]
        async with s.post(url, data=b"{}", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 400
        async with s.get(sim.url + "/v1/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == 404


async def test_x_sim_fail(sim: SimHandle) -> None:
    async with client(sim) as c:
        with pytest.raises(openai.InternalServerError) as info:
            await c.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers={"x-sim-fail": "500"})
        assert info.value.status_code == 500
        assert info.value.body["type"] == "InternalServerError" and info.value.body["code"] == 500
        with pytest.raises(openai.RateLimitError):
            await c.completions.create(model=MODEL, prompt="x", extra_headers={"x-sim-fail": "429"})


async def test_x_sim_abort_after(sim: SimHandle) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    received = b""
    async with aiohttp.ClientSession() as s, s.post(sim.url + "/v1/chat/completions", json=body,
                                                    headers={"x-sim-abort-after": "3"}) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for data in r.content.iter_any():
                received += data
    events = [e for e in received.decode().split("\n\n") if e]
    assert len(events) == 3 and b"[DONE]" not in received
    assert await metric(sim, 'vllm:request_success_total{engine="0",finished_reason="abort"') == 1
    assert await metric(sim, "vllm:num_requests_running") == 0

    async with client(sim) as c:
        with pytest.raises(openai.APIConnectionError):  # non-streaming: closed with no response
            await c.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers={"x-sim-abort-after": "0"})


# ---- server flags -----------------------------------------------------------------------

async def test_force_include_usage() -> None:
    handle = await start_sim(SimConfig(port=0, enable_force_include_usage=True))
    try:
        events = await raw_sse(handle, "/v1/chat/completions",
                               {"model": MODEL, "messages": MESSAGES, "stream": True,
                                "stream_options": {"include_usage": False}})
    finally:
        await handle.close()
    assert all("usage" in e for e in events[:-1])  # forced: final usage and continuous usage
    assert events[-2]["choices"] == [] and events[-2]["usage"]["prompt_tokens"] == prompt_len(MESSAGES)


async def test_prompt_tokens_details_prefix_cache() -> None:
    handle = await start_sim(SimConfig(port=0, enable_prompt_tokens_details=True))
    long_messages = [{"role": "user", "content": "metering " * 100}]
    plen = prompt_len(long_messages)
    try:
        async with client(handle) as c:
            first = await c.chat.completions.create(model=MODEL, messages=long_messages)
            second = await c.chat.completions.create(model=MODEL, messages=long_messages)
            stream = await c.chat.completions.create(model=MODEL, messages=long_messages, stream=True,
                                                     stream_options={"include_usage": True})
            final = [ch async for ch in stream][-1]
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens == (plen - 1) // 16 * 16
        assert final.usage.prompt_tokens_details.cached_tokens == (plen - 1) // 16 * 16
        assert await metric(handle, "vllm:prefix_cache_queries_total") == 3 * plen
        assert await metric(handle, "vllm:prefix_cache_hits_total") == 2 * ((plen - 1) // 16 * 16)
    finally:
        await handle.close()


async def test_reasoning_mode() -> None:
    handle = await start_sim(SimConfig(port=0, reasoning=True))
    try:
        events = await raw_sse(handle, "/v1/chat/completions",
                               {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 500,
                                "stream_options": {"include_usage": True}})
        async with client(handle) as c:
            r = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=500)
    finally:
        await handle.close()
    deltas = [e["choices"][0]["delta"] for e in events[1:-2]]
    kinds = ["reasoning" if "reasoning" in d else "content" for d in deltas]
    assert kinds[0] == "reasoning" and kinds[-1] == "content"
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # all reasoning, then all content
    reasoning = "".join(d.get("reasoning", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    u = events[-2]["usage"]
    assert u["completion_tokens_details"] == {"reasoning_tokens": len(gen.encode(reasoning))}
    assert u["completion_tokens"] == len(gen.encode(reasoning)) + completion_len(content, "stop")
    msg = r.choices[0].message
    assert msg.model_extra["reasoning"] == reasoning and msg.content == content  # same request, same text
    assert r.usage.completion_tokens_details.reasoning_tokens == u["completion_tokens_details"]["reasoning_tokens"]


async def test_served_names_models_health_and_timing() -> None:
    cfg = SimConfig(port=0, served_model_names=["llama"], ttft_ms=150, tokens_per_second=200)
    handle = await start_sim(cfg)
    try:
        async with client(handle) as c:
            models = await c.models.list()
            assert [m.id for m in models.data] == [MODEL, "llama"]
            started = time.monotonic()
            stream = await c.chat.completions.create(model="llama", messages=MESSAGES, stream=True, max_tokens=10)
            arrivals = []
            async for chunk in stream:
                arrivals.append(time.monotonic() - started)
                assert chunk.model == MODEL  # vLLM answers with the first served name
        assert arrivals[0] >= 0.14  # TTFT
        assert arrivals[-1] - arrivals[0] >= 9 / 200 * 0.9  # 10 tokens at 200 tok/s
        async with aiohttp.ClientSession() as s, s.get(handle.url + "/health") as r:
            assert r.status == 200
        assert await metric(handle, "vllm:time_to_first_token_seconds_sum") >= 0.14
    finally:
        await handle.close()


async def test_metrics_count_served_tokens(sim: SimHandle) -> None:
    assert await metric(sim, "vllm:prompt_tokens_total") == 0
    async with client(sim) as c:
        r1 = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=300)
        stream = await c.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, max_tokens=5)
        chunks = [ch async for ch in stream]
    assert len(chunks) == 6
    assert await metric(sim, "vllm:prompt_tokens_total") == 2 * prompt_len(MESSAGES)
    assert await metric(sim, "vllm:generation_tokens_total") == r1.usage.completion_tokens + 5
    assert await metric(sim, 'vllm:request_success_total{engine="0",finished_reason="length"') == 1
    assert await metric(sim, 'vllm:request_success_total{engine="0",finished_reason="stop"') == 1
    assert await metric(sim, "vllm:time_to_first_token_seconds_count") == 2
    assert await metric(sim, "vllm:num_requests_running") == 0
    assert await metric(sim, "vllm:kv_cache_usage_perc") == 0


def test_generation_round_trips_through_the_tokenizer() -> None:
    for seed in range(200):
        out = gen.generate([1, 2, seed], 0, 10_000, seed=seed)
        assert out.finish_reason == "stop" and out.token_ids[-1] == gen.EOT_ID
        assert gen.encode(out.content_text) == out.token_ids[:-1]
    cut = gen.generate([7], 0, 5)
    assert cut.finish_reason == "length" and len(cut.token_ids) == 5

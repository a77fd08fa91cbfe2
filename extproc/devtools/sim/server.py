"""aiohttp app: vLLM's OpenAI-compatible endpoints over the simulated engine."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import signal
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from extproc.devtools.sim import audio_apis, chat_apis, pooling_apis, tokenization
from extproc.devtools.sim import generation as gen
from extproc.devtools.sim.config import SimConfig
from extproc.devtools.sim.metrics import SimMetrics
from extproc.devtools.sim.prefix_cache import PrefixCache
from extproc.devtools.sim.protocol import (
    SimError,
    bad_request,
    chat_chunk,
    chat_message,
    check_model,
    completion_chunk,
    error_body,
    field,
    parse_common,
    require,
    resolve_max_tokens,
    status_error,
    usage,
    usage_chunk,
    validation_error,
)
from extproc.devtools.sim.routes import Routes

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}
_DONE = b"data: [DONE]\n\n"


class _Abort(Exception):
    """x-sim-abort-after reached."""


@dataclass
class _Seq:
    index: int  # choice index in the response
    prompt: int  # which prompt of the request it continues
    out: gen.Output
    deltas: list[str]

    @property
    def length(self) -> int:
        return len(self.out.token_ids)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def _read_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise SimError(400, "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                       "Bad Request")
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise validation_error("json_invalid", ("body", exc.pos), "JSON decode error") from None
    if not isinstance(body, dict):
        raise validation_error("model_attributes_type", ("body",),
                               "Input should be a valid dictionary or object to extract fields from")
    return body


def _base_id(request: web.Request) -> str:
    # vLLM builds response ids from the X-Request-Id header when the client sends one.
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def _abort_after(request: web.Request) -> int | None:
    value = request.headers.get("x-sim-abort-after")
    return int(value) if value and value.strip().isdigit() else None


def _first_write_bytes(request: web.Request) -> int:
    """x-sim-first-write-bytes: N writes the first event N bytes at a time, each on its own
    loop turn, as a busy upstream or a proxy between does (Envoy forwards each as it reads it)."""
    value = request.headers.get("x-sim-first-write-bytes", "").strip()
    return int(value) if value.isdigit() else 0


@web.middleware
async def _error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    fail = request.headers.get("x-sim-fail", "").strip()
    if fail.isdigit() and 400 <= int(fail) <= 599:
        err = status_error(int(fail), f"Simulated failure (x-sim-fail: {fail})")
        return _json(err.body(), err.status)
    try:
        return await handler(request)
    except SimError as exc:
        return _json(exc.body(), exc.status)
    except web.HTTPException as exc:  # unknown route / method: JSON like vLLM's HTTP handler
        if exc.status < 400:
            raise
        return _json(error_body(exc.reason, exc.reason, exc.status), exc.status)
    except Exception as exc:
        log.exception("simulator error")
        return _json(error_body(str(exc), "InternalServerError", 500), 500)


class Simulator:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.cache = PrefixCache(cfg.block_size)
        self.metrics = SimMetrics(cfg.model, cfg.kv_cache_blocks, cfg.block_size)
        self.auth_rejected = 0  # requests refused by api_key / reject_any_key

    # ---- engine ----------------------------------------------------------------------

    async def _steps(self, prompts: list[list[int]], cached: list[int], seqs: list[_Seq]
                     ) -> AsyncIterator[list[tuple[_Seq, int]]]:
        """Engine iterations: after TTFT, then every 1/tokens_per_second, each unfinished
        sequence produces its next token. Yields (sequence, token position) per step. Metrics
        and the prefix cache are updated as vLLM would; a request left early counts as abort."""
        cfg, m = self.cfg, self.metrics
        for p, c in zip(prompts, cached, strict=True):
            m.start(len(p), c)
        generated = [0] * len(prompts)
        started = time.monotonic()
        done = False
        try:
            await asyncio.sleep(cfg.ttft_ms / 1000)
            m.ttft.observe(time.monotonic() - started)
            delay = 1 / cfg.tokens_per_second if cfg.tokens_per_second > 0 else 0.0
            last = time.monotonic()
            for step in range(max((s.length for s in seqs), default=0)):
                if step and delay:
                    await asyncio.sleep(delay)
                    now = time.monotonic()
                    m.itl.observe(now - last)
                    last = now
                batch = [(s, step) for s in seqs if step < s.length]
                for s, _ in batch:
                    generated[s.prompt] += 1
                m.generated(len(batch))
                yield batch
            done = True
        finally:
            e2e = time.monotonic() - started
            for i, p in enumerate(prompts):
                reasons = [s.out.finish_reason for s in seqs if s.prompt == i]
                m.finish(reasons[0] if done and reasons else "abort", len(p) + generated[i], e2e)
            if done:
                for s in seqs:
                    self.cache.insert([*prompts[s.prompt], *s.out.token_ids])

    @staticmethod
    async def _run_to_end(request: web.Request, steps: AsyncIterator[Any]) -> bool:
        """Non-streaming: run generation to the end. False when x-sim-abort-after asks to drop
        the connection instead of answering."""
        if _abort_after(request) is not None:
            request.protocol.force_close()
            return False
        async with aclosing(steps) as it:
            async for _ in it:
                pass
        return True

    def _lookup(self, prompts: list[list[int]]) -> list[int]:
        return [self.cache.match(p) for p in prompts]

    def _usage(self, prompts: list[list[int]], cached: list[int], seqs: list[_Seq], *, final: bool) -> dict[str, Any]:
        cfg = self.cfg
        reasoning = sum(s.out.reasoning_len for s in seqs) if cfg.reasoning and cfg.reasoning_tokens_details else None
        return usage(sum(map(len, prompts)), sum(s.length for s in seqs),
                     cached=cached[0] if cfg.enable_prompt_tokens_details else None,
                     reasoning=reasoning, details_null=not final)

    def _seqs(self, prompts: list[list[int]], n: int, max_tokens: list[int], seed: Any) -> list[_Seq]:
        seqs = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                out = gen.generate(prompt, i, max_tokens[p], seed=(self.cfg.seed, seed), reasoning=self.cfg.reasoning)
                seqs.append(_Seq(p * n + i, p, out, out.deltas()))
        return seqs

    # ---- endpoints -------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        cfg = self.cfg
        body = await _read_body(request)
        messages = require(body, "messages")
        if not isinstance(messages, list):
            raise validation_error("list_type", ("body", "messages"), "Input should be a valid list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise validation_error("missing", ("body", "messages", i, "role"), "Field required")
        mct = field(body, "max_completion_tokens", int)
        requested = mct if mct is not None else field(body, "max_tokens", int)
        common = parse_common(body, cfg, requested)
        add_generation_prompt = field(body, "add_generation_prompt", bool, True) is not False
        check_model(body, cfg)
        try:
            prompt = gen.chat_prompt_ids(messages, add_generation_prompt)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        max_tokens = resolve_max_tokens(cfg, len(prompt), requested)
        prompts = [prompt]
        seqs = self._seqs(prompts, common.n, [max_tokens], common.seed)
        cached = self._lookup(prompts)
        rid, created = "chatcmpl-" + _base_id(request), int(time.time())
        steps = self._steps(prompts, cached, seqs)
        if common.stream:
            final = (usage_chunk(rid, created, cfg.model, "chat.completion.chunk",
                                 self._usage(prompts, cached, seqs, final=True)) if common.include_usage else None)
            events = self._chat_events(rid, created, len(prompt), seqs, steps, common.continuous_usage)
            return await self._sse(request, events, final, steps)
        if not await self._run_to_end(request, steps):
            return web.Response()
        choices = []
        for s in seqs:
            r = s.out.reasoning_len
            content = "".join(s.deltas[r:])
            reasoning = "".join(s.deltas[:r]) if cfg.reasoning else None
            message = chat_message(content if content or not cfg.reasoning else None, reasoning)
            choices.append({"index": s.index, "message": message, "logprobs": None,
                            "finish_reason": s.out.finish_reason, "stop_reason": None, "token_ids": None})
        return _json({"id": rid, "object": "chat.completion", "created": created, "model": cfg.model,
                      "choices": choices, "service_tier": None, "system_fingerprint": None,
                      "usage": self._usage(prompts, cached, seqs, final=False), "prompt_logprobs": None,
                      "prompt_token_ids": None, "kv_transfer_params": None})

    async def _chat_events(self, rid: str, created: int, prompt_len: int, seqs: list[_Seq],
                           steps: AsyncIterator[list[tuple[_Seq, int]]], continuous: bool
                           ) -> AsyncIterator[dict[str, Any]]:
        cfg, model = self.cfg, self.cfg.model
        details = cfg.reasoning and cfg.reasoning_tokens_details

        def live_usage(s: _Seq, done: int) -> dict[str, Any] | None:
            # continuous_usage_stats: this choice's running totals, never a sum over choices
            if not continuous:
                return None
            return usage(prompt_len, done, reasoning=min(done, s.out.reasoning_len) if details else None)

        first = True
        async for batch in steps:
            if first:  # vLLM sends the role once per choice, with the first engine output
                first = False
                for s in seqs:
                    yield chat_chunk(rid, created, model, s.index, {"role": "assistant", "content": ""},
                                     chunk_usage=live_usage(s, 0))
            for s, t in batch:
                last = t == s.length - 1
                text = s.deltas[t]
                in_reasoning = t < s.out.reasoning_len
                if in_reasoning and not text and not last:
                    continue  # the reasoning parser emits nothing for a token with no text yet
                delta = {"reasoning": text} if in_reasoning else {"content": text}
                yield chat_chunk(rid, created, model, s.index, delta, s.out.finish_reason if last else None,
                                 live_usage(s, t + 1))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        cfg = self.cfg
        body = await _read_body(request)
        prompts = _prompt_ids(require(body, "prompt"), "prompt")
        requested = field(body, "max_tokens", int, 16)  # CompletionRequest.max_tokens defaults to 16
        common = parse_common(body, cfg, requested)
        check_model(body, cfg)
        max_tokens = [resolve_max_tokens(cfg, len(p), requested) for p in prompts]
        seqs = self._seqs(prompts, common.n, max_tokens, common.seed)
        cached = self._lookup(prompts)
        rid, created = "cmpl-" + _base_id(request), int(time.time())
        steps = self._steps(prompts, cached, seqs)
        if common.stream:
            final = (usage_chunk(rid, created, cfg.model, "text_completion",
                                 self._usage(prompts, cached, seqs, final=True)) if common.include_usage else None)

            async def events() -> AsyncIterator[dict[str, Any]]:
                async for batch in steps:
                    for s, t in batch:
                        last = t == s.length - 1
                        live = usage(len(prompts[s.prompt]), t + 1) if common.continuous_usage else None
                        yield completion_chunk(rid, created, cfg.model, s.index, s.deltas[t],
                                               s.out.finish_reason if last else None, live)

            return await self._sse(request, events(), final, steps)
        if not await self._run_to_end(request, steps):
            return web.Response()
        choices = [{"index": s.index, "text": "".join(s.deltas), "logprobs": None,
                    "finish_reason": s.out.finish_reason, "stop_reason": None, "prompt_logprobs": None}
                   for s in seqs]
        return _json({"id": rid, "object": "text_completion", "created": created, "model": cfg.model,
                      "choices": choices, "service_tier": None, "system_fingerprint": None,
                      "usage": self._usage(prompts, cached, seqs, final=False), "kv_transfer_params": None})

    async def _sse(self, request: web.Request, events: AsyncIterator[dict[str, Any]],
                   final: dict[str, Any] | None, steps: AsyncIterator[Any]) -> web.StreamResponse:
        """Writes `data: {json}` events, the optional usage chunk and [DONE]."""
        async def frames() -> AsyncIterator[bytes]:
            async with aclosing(events) as it:
                async for event in it:
                    yield b"data: " + orjson.dumps(event) + b"\n\n"
            if final is not None:
                yield b"data: " + orjson.dumps(final) + b"\n\n"
            yield _DONE

        return await self.stream_frames(request, frames(), steps)

    async def stream_frames(self, request: web.Request, frames: AsyncIterator[bytes],
                            steps: AsyncIterator[Any]) -> web.StreamResponse:
        """Writes SSE frames, one write each. Honours x-sim-abort-after (frames written before
        the connection drops) and x-sim-first-write-bytes; a client that goes away ends
        generation (vLLM aborts the request)."""
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        limit = _abort_after(request)
        piece = _first_write_bytes(request)
        sent = 0

        async def send(data: bytes) -> None:
            nonlocal sent
            if limit is not None and sent >= limit:
                raise _Abort
            if sent == 0 and piece:
                for start in range(0, len(data), piece):
                    await resp.write(data[start:start + piece])
                    await asyncio.sleep(0.002)  # the upstream's own pace, not a test's wait
            else:
                await resp.write(data)
            sent += 1

        async with aclosing(steps), aclosing(frames) as it:
            try:
                await resp.prepare(request)
                async for frame in it:
                    await send(frame)
            except _Abort:
                request.protocol.force_close()  # flushes what was written, then closes: no end chunk
            except ConnectionError:
                pass
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        cfg = self.cfg
        body = await _read_body(request)
        inputs = _prompt_ids(require(body, "input"), "input")
        fmt = field(body, "encoding_format", str, "float")
        if fmt not in ("float", "base64"):
            raise validation_error("literal_error", ("body", "encoding_format"), "Input should be 'float' or 'base64'")
        dims = field(body, "dimensions", int)
        check_model(body, cfg)
        if dims is not None and dims != cfg.embedding_dim:
            raise bad_request("Model does not support matryoshka representation, changing output dimensions "
                              "will lead to poor results.")
        for ids in inputs:
            if len(ids) > cfg.max_model_len:
                raise bad_request(
                    f"This model's maximum context length is {cfg.max_model_len} tokens. However, you "
                    f"requested {len(ids)} tokens in the input for embedding generation. Please reduce "
                    "the length of the input.", param="input_tokens")
        started = time.monotonic()
        for ids in inputs:
            self.metrics.start(len(ids), 0)
        try:
            await asyncio.sleep(cfg.ttft_ms / 1000)
        finally:
            for ids in inputs:
                self.metrics.finish("stop", len(ids), time.monotonic() - started)
        data = []
        for i, ids in enumerate(inputs):
            vec = gen.embed(ids, cfg.embedding_dim, cfg.seed)
            emb: Any = base64.b64encode(array("f", vec).tobytes()).decode() if fmt == "base64" else vec
            data.append({"index": i, "object": "embedding", "embedding": emb})
        total = sum(map(len, inputs))
        return _json({"id": "embd-" + _base_id(request), "object": "list", "created": int(time.time()),
                      "model": cfg.model, "data": data, "usage": usage(total, 0, details_null=True)})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await chat_apis.responses(self, request, await _read_body(request))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _read_body(request)
        except SimError as exc:
            return chat_apis.anthropic_error(exc)
        return await chat_apis.messages(self, request, body)

    def pooling_route(self, handler: Callable[..., Awaitable[web.StreamResponse]]
                      ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def route(request: web.Request) -> web.StreamResponse:
            return await handler(self, request, await _read_body(request))
        return route

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        cards = [{"id": name, "object": "model", "created": now, "owned_by": "vllm", "root": self.cfg.model,
                  "parent": None, "max_model_len": self.cfg.max_model_len,
                  "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                                  "created": now, "allow_create_engine": False, "allow_sampling": True,
                                  "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                  "allow_fine_tuning": False, "organization": "*", "group": None,
                                  "is_blocking": False}]}
                 for name in self.cfg.served_names]
        return _json({"object": "list", "data": cards})

    async def tokenize(self, request: web.Request) -> web.Response:
        return _json(tokenization.tokenize(await _read_body(request), self.cfg))

    async def detokenize(self, request: web.Request) -> web.Response:
        return _json(tokenization.detokenize(await _read_body(request), self.cfg))

    async def count_tokens(self, request: web.Request) -> web.Response:
        """/v1/messages/count_tokens: the Messages request's prompt, counted, no generation."""
        try:
            body = await _read_body(request)
            check_model(body, self.cfg)
            ids = gen.chat_prompt_ids(chat_apis.anthropic_messages(body))
        except SimError as exc:
            return chat_apis.anthropic_error(exc)
        return _json({"input_tokens": len(ids), "context_management": {"original_input_tokens": len(ids)}})

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": "0.0.0+sim"})
    async def auth_stats(self, request: web.Request) -> web.Response:
        return _json({"auth_rejected": self.auth_rejected}, 200)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def prometheus(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})


def _prompt_ids(value: Any, name: str) -> list[list[int]]:
    """A completions `prompt` / embeddings `input`: string, list of strings (a batch), list of
    token ids, or list of token-id lists. Text gets the BOS the model's tokenizer would add."""
    def ids_ok(v: Any) -> bool:
        return isinstance(v, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < gen.VOCAB_SIZE for t in v)

    if isinstance(value, str):
        return [gen.text_prompt_ids(value)]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [gen.text_prompt_ids(v) for v in value]
        if ids_ok(value):
            return [list(value)]
        if all(ids_ok(v) and v for v in value):
            return [list(v) for v in value]
    if isinstance(value, list) and not value:
        raise bad_request(f"{name} cannot be empty", param=name)
    raise validation_error("union_type", ("body", name),
                           "Input should be a string, a list of strings, a list of token ids "
                           "(0 <= id < 128256) or a list of such lists")


SIM_KEY = web.AppKey("sim", Simulator)


def _auth_middleware(cfg: SimConfig) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.path.startswith("/v1"):
            auth = request.headers.get("Authorization")
            other = request.headers.get("x-api-key")
            bad = ""
            if cfg.reject_any_key and (auth is not None or other is not None):
                bad = "a client key reached the upstream"
            elif cfg.api_key and (auth != f"Bearer {cfg.api_key}" or other is not None):
                bad = "the request does not carry the upstream key (a client key reached the upstream?)"
            if bad:
                request.app[SIM_KEY].auth_rejected += 1
                log.error("simulator refused %s: %s", request.path, bad)
                return _json(error_body(bad, "Unauthorized", 401), 401)
        return await handler(request)

    return check


def create_app(cfg: SimConfig) -> web.Application:
    gen.get_tokenizer()  # load now (~0.3 s), not on the first request
    sim = Simulator(cfg)
    middlewares = [_error_middleware]
    if cfg.api_key or cfg.reject_any_key:
        middlewares.insert(0, _auth_middleware(cfg))
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
    app[SIM_KEY] = sim
    routes = Routes()
    routes.add("POST", "/v1/chat/completions", sim.chat)
    routes.add("POST", "/v1/completions", sim.completions)
    routes.add("POST", "/v1/embeddings", sim.embeddings)
    routes.add("POST", "/v1/responses", sim.responses)
    routes.add("POST", "/v1/messages", sim.messages)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        routes.add("POST", path, sim.pooling_route(pooling_apis.rerank))
    for path in ("/score", "/v1/score"):
        routes.add("POST", path, sim.pooling_route(pooling_apis.score))
    routes.add("POST", "/classify", sim.pooling_route(pooling_apis.classify))
    routes.add("POST", "/pooling", sim.pooling_route(pooling_apis.pooling))
    routes.add("POST", "/v2/embed", sim.pooling_route(pooling_apis.cohere_embed))
    routes.add("POST", "/invocations", sim.pooling_route(pooling_apis.invocations))
    for task, path in (("transcription", "/v1/audio/transcriptions"), ("translation", "/v1/audio/translations")):
        routes.add("POST", path, functools.partial(audio_apis.speech_to_text, sim, task=task))
    routes.add("GET", "/v1/models", sim.models)
    routes.add("GET", "/health", sim.health)
    routes.add("GET", "/version", sim.version)
    routes.add("POST", "/tokenize", sim.tokenize)
    routes.add("POST", "/detokenize", sim.detokenize)
    routes.add("POST", "/v1/messages/count_tokens", sim.count_tokens)
    routes.add("GET", "/metrics", sim.prometheus)
    routes.add("GET", "/sim/auth", sim.auth_stats)
    # one catch-all: aiohttp's own router would match the path before decoding %2F
    app.router.add_route("*", "/{path:.*}", routes.dispatch)
    return app


@dataclass
class SimHandle:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_sim(cfg: SimConfig) -> SimHandle:
    """Serve in the running event loop; port 0 binds an ephemeral port (see handle.port)."""
    runner = web.AppRunner(create_app(cfg), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    port = runner.addresses[0][1]
    return SimHandle(runner, cfg.host, port)


def run_sim(cfg: SimConfig) -> None:
    """Blocking; stops on SIGINT/SIGTERM."""
    async def main() -> None:
        handle = await start_sim(cfg)
        log.info("vLLM simulator serving %s on %s", ", ".join(cfg.served_names), handle.url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await handle.close()

    asyncio.run(main())

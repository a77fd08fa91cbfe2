"""vLLM's pooling-model routes over the simulated model: rerank (/rerank, /v1/rerank,
/v2/rerank), score (/score, /v1/score), /classify, /pooling, Cohere's /v2/embed, and
/invocations, dispatched by the body's shape as vLLM does.

Token counts: each text gets the BOS the tokenizer adds; a cross-encoder reads the query and a
document as one sequence (query ids then document ids), once per document. Scores and vectors
are deterministic functions of the ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from extproc.devtools.sim import generation as gen
from extproc.devtools.sim.protocol import bad_request, check_model, require, usage, validation_error

if TYPE_CHECKING:
    from extproc.devtools.sim.server import Simulator


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


def _texts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list) and not value:
        raise bad_request(f"{name} cannot be empty", param=name)
    raise validation_error("union_type", ("body", name), "Input should be a valid string or a list of strings")


def _score(ids: list[int]) -> float:
    digest = hashlib.sha256(orjson.dumps(ids)).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def _pair_ids(query: str, doc: str) -> list[int]:
    return gen.text_prompt_ids(query) + gen.encode(doc)


async def _run(sim: Simulator, seqs: list[list[int]]) -> None:
    """One engine pass over the inputs (prompt tokens counted in the metrics, as vLLM does)."""
    cfg, started = sim.cfg, time.monotonic()
    for ids in seqs:
        if len(ids) > cfg.max_model_len:
            raise bad_request(f"This model's maximum context length is {cfg.max_model_len} tokens. However, you "
                              f"requested {len(ids)} tokens in the input. Please reduce the length of the input.")
    for ids in seqs:
        sim.metrics.start(len(ids), 0)
    try:
        await asyncio.sleep(cfg.ttft_ms / 1000)
    finally:
        for ids in seqs:
            sim.metrics.finish("stop", len(ids), time.monotonic() - started)


def _rid(request: web.Request, prefix: str) -> str:
    return prefix + (request.headers.get("x-request-id") or uuid.uuid4().hex)


async def rerank(sim: Simulator, request: web.Request, body: dict[str, Any]) -> web.Response:
    check_model(body, sim.cfg)
    query = require(body, "query")
    if not isinstance(query, str):
        raise validation_error("string_type", ("body", "query"), "Input should be a valid string")
    docs = _texts(require(body, "documents"), "documents")
    top_n = body.get("top_n") or len(docs)
    pairs = [_pair_ids(query, d) for d in docs]
    await _run(sim, pairs)
    results = sorted(({"index": i, "document": {"text": d}, "relevance_score": _score(p)}
                      for i, (d, p) in enumerate(zip(docs, pairs, strict=True))),
                     key=lambda r: -r["relevance_score"])[:top_n]
    total = sum(map(len, pairs))
    return _json({"id": _rid(request, "rerank-"), "model": sim.cfg.model,
                  "usage": {"prompt_tokens": total, "total_tokens": total}, "results": results})


async def score(sim: Simulator, request: web.Request, body: dict[str, Any]) -> web.Response:
    check_model(body, sim.cfg)
    left = _texts(require(body, "text_1"), "text_1")
    right = _texts(require(body, "text_2"), "text_2")
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise bad_request("text_1 and text_2 must have the same length, or text_1 a single item")
    pairs = [_pair_ids(a, b) for a, b in zip(left, right, strict=True)]
    await _run(sim, pairs)
    total = sum(map(len, pairs))
    return _json({"id": _rid(request, "score-"), "object": "list", "created": int(time.time()),
                  "model": sim.cfg.model,
                  "data": [{"index": i, "object": "score", "score": _score(p)} for i, p in enumerate(pairs)],
                  "usage": usage(total, 0, details_null=True)})


async def classify(sim: Simulator, request: web.Request, body: dict[str, Any]) -> web.Response:
    check_model(body, sim.cfg)
    inputs = [gen.text_prompt_ids(t) for t in _texts(require(body, "input"), "input")]
    await _run(sim, inputs)
    data = []
    for i, ids in enumerate(inputs):
        p = _score(ids)
        data.append({"index": i, "label": "positive" if p >= 0.5 else "negative", "probs": [1 - p, p],
                     "num_classes": 2})
    total = sum(map(len, inputs))
    return _json({"id": _rid(request, "classify-"), "object": "list", "created": int(time.time()),
                  "model": sim.cfg.model, "data": data, "usage": usage(total, 0, details_null=True)})


async def pooling(sim: Simulator, request: web.Request, body: dict[str, Any]) -> web.Response:
    check_model(body, sim.cfg)
    inputs = [gen.text_prompt_ids(t) for t in _texts(require(body, "input"), "input")]
    await _run(sim, inputs)
    data = [{"index": i, "object": "pooling", "data": gen.embed(ids, sim.cfg.embedding_dim, sim.cfg.seed)}
            for i, ids in enumerate(inputs)]
    total = sum(map(len, inputs))
    return _json({"id": _rid(request, "pool-"), "object": "list", "created": int(time.time()),
                  "model": sim.cfg.model, "data": data, "usage": usage(total, 0, details_null=True)})


async def cohere_embed(sim: Simulator, request: web.Request, body: dict[str, Any]) -> web.Response:
    check_model(body, sim.cfg)
    texts = _texts(require(body, "texts"), "texts")
    inputs = [gen.text_prompt_ids(t) for t in texts]
    await _run(sim, inputs)
    vectors = [gen.embed(ids, sim.cfg.embedding_dim, sim.cfg.seed) for ids in inputs]
    return _json({"id": _rid(request, "embd-"), "embeddings": {"float": vectors}, "texts": texts,
                  "meta": {"api_version": {"version": "2"},
                           "billed_units": {"input_tokens": sum(map(len, inputs))}}})


async def invocations(sim: Simulator, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """The handler of the first request type the body validates as, in vLLM's order."""
    if "messages" in body:
        return await sim.chat(request)
    if "prompt" in body:
        return await sim.completions(request)
    if "input" in body:
        return await sim.embeddings(request)
    if "text_1" in body and "text_2" in body:
        return await score(sim, request, body)
    if "query" in body and "documents" in body:
        return await rerank(sim, request, body)
    raise bad_request("Cannot find suitable handler for request. Expected one of: ChatCompletionRequest, "
                      "CompletionRequest, EmbeddingRequest, ClassificationRequest, ScoreRequest, "
                      "RerankRequest, PoolingRequest")

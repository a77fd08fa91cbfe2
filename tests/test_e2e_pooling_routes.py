"""vLLM's pooling-model routes (rerank, score, classify, pooling, Cohere embed) and /invocations
through the real Envoy in sync, hybrid and observe mode: the stored usage equals what the
simulator counted, and the client gets the simulator's bytes."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
import uuid

import orjson
import pytest

from tests.stack import metered_stack, wait_events
from tests.test_e2e import MODEL, MSG, _sim_counters

DOCS = ["GPU hours are billed per team.", "A café in 東京 sells jalapeño bread.", "Budgets reset monthly."]
CASES = [
    ("/rerank", {"model": MODEL, "query": "How is GPU time billed?", "documents": DOCS}, "rerank"),
    ("/v1/rerank", {"model": MODEL, "query": "How is GPU time billed?", "documents": DOCS, "top_n": 2}, "rerank"),
    ("/v2/rerank", {"model": MODEL, "query": "budgets", "documents": DOCS}, "rerank"),
    ("/score", {"model": MODEL, "text_1": "GPU billing", "text_2": DOCS}, "score"),
    ("/v1/score", {"model": MODEL, "text_1": DOCS, "text_2": DOCS[::-1]}, "score"),
    ("/classify", {"model": MODEL, "input": DOCS}, "classify"),
    ("/pooling", {"model": MODEL, "input": "one text"}, "pooling"),
    ("/v2/embed", {"model": MODEL, "texts": DOCS, "input_type": "search_document",
                   "embedding_types": ["float"]}, "cohere_embed"),
    ("/invocations", {"model": MODEL, "messages": MSG, "max_tokens": 6}, "chat"),
    ("/invocations", {"model": MODEL, "prompt": "Once upon", "max_tokens": 5}, "completions"),
    ("/invocations", {"model": MODEL, "input": ["a b", "c"]}, "embeddings"),
    ("/invocations", {"model": MODEL, "text_1": "x", "text_2": ["y", "z"]}, "score"),
    ("/invocations", {"model": MODEL, "query": "q", "documents": ["d1", "d2"]}, "rerank"),
    ("/invocations", {"model": MODEL, "messages": MSG, "max_tokens": 6, "stream": True}, "chat"),
]
_VOLATILE = re.compile(rb'"created":\d+')


@pytest.fixture(params=["sync", "hybrid", "observe"])
def stack(request, sim, tmp_path):
    with metered_stack(tmp_path, sim, mode=request.param) as (url, rec, sc):
        yield request.param, url, rec, sc


def _post(url: str, body: dict, rid: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=orjson.dumps(body), method="POST", headers={
        "content-type": "application/json", "x-request-id": rid, "x-user": rid, "x-team": "pooling"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, _VOLATILE.sub(b"", r.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_every_pooling_route_and_invocation_is_metered_exactly(stack, sim):
    mode, url, rec, sc = stack
    for path, body, endpoint in CASES:
        rid = uuid.uuid4().hex
        direct = _post(sim + path, body, rid)
        before = _sim_counters(sim)
        via = _post(url + path, body, rid)
        after = _sim_counters(sim)
        truth = (after[0] - before[0], after[1] - before[1])
        if mode == "hybrid" and body.get("stream"):
            # hybrid mode asks vLLM for usage and cannot hide the extra chunk (README)
            assert via[0] == direct[0] and b'"choices":[],"usage":{' in via[1]
        else:
            assert via == direct, (path, endpoint)  # nothing injected reaches the client
        ev = wait_events(rec, rid, 1)[0]
        assert ev.metered and not ev.error and ev.endpoint == endpoint, (path, ev.endpoint, ev.error_detail)
        assert ev.path == path
        if mode == "observe" and body.get("stream"):
            # observe mode cannot ask for usage: counted by the tokenizer, less the EOS token (the
            # prompt count without the chat template is issue 12 item 6's)
            assert ev.token_source == 2 and ev.prompt_tokens > 0
            assert ev.completion_tokens == truth[1] - (ev.finish_reason == "stop")
            continue
        assert ev.token_source == 1, (path, endpoint)
        assert (ev.prompt_tokens, ev.completion_tokens) == truth, (path, endpoint)
    assert not sc.sidecar.service.pending


def test_an_invocation_of_no_known_shape(stack, sim):
    mode, url, rec, sc = stack
    rid = uuid.uuid4().hex
    status, body = _post(url + "/invocations", {"model": MODEL, "what": "?"}, rid)
    assert status == 400 and b"Cannot find suitable handler" in body
    ev = wait_events(rec, rid, 1)[0]
    assert ev.endpoint == "invocations" and ev.error in ("unknown_invocation", "upstream_error")
    assert ev.token_source == 3

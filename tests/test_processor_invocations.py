"""/invocations: the body's shape picks the processor, in vLLM's order; streams through it get
the chat processor's usage handling; no known shape is flagged."""

from __future__ import annotations

import orjson
import pytest

from extproc.events import TokenSource
from extproc.processors.invocations import processor_class
from tests.processor_helpers import run
from tests.recorded_responses import CHAT_STREAM


@pytest.mark.parametrize(("body", "endpoint"), [
    ({"messages": [], "prompt": "x", "input": "y"}, "chat"),  # chat first, as vLLM tries it first
    ({"prompt": "x", "input": "y"}, "completions"),
    ({"input": "y", "query": "q", "documents": []}, "embeddings"),
    ({"text_1": "a", "text_2": "b", "query": "q", "documents": []}, "score"),
    ({"query": "q", "documents": ["d"]}, "rerank"),
])
def test_dispatch_order(body, endpoint):
    assert processor_class(body).endpoint == endpoint


def test_a_chat_stream_is_metered_and_its_usage_chunk_hidden():
    ex, ev, client, answer = run("/invocations", orjson.loads(CHAT_STREAM.request), 200, [CHAT_STREAM.response, b""])
    assert answer.request_body.response.body_mutation.body  # include_usage asked for
    assert ev.endpoint == "chat" and ev.path == "/invocations" and ev.usage_injected
    assert (ev.prompt_tokens, ev.completion_tokens) == (19, 4) and ev.token_source == TokenSource.UPSTREAM_USAGE
    assert b'"choices":[]' not in client and client.endswith(b"data: [DONE]\n\n")


def test_embeddings_json():
    body = orjson.dumps({"data": [{"index": 0}], "usage": {"prompt_tokens": 3, "total_tokens": 3}})
    _, ev, _, _ = run("/invocations", {"model": "m", "input": "a b"}, 200, [body])
    assert (ev.endpoint, ev.prompt_tokens, ev.token_source) == ("embeddings", 3, TokenSource.UPSTREAM_USAGE)


def test_unknown_shape_and_bad_bodies():
    _, ev, _, _ = run("/invocations", {"model": "m", "what": 1}, 400, [b'{"error": {"message": "no handler"}}'])
    assert (ev.endpoint, ev.error, ev.token_source) == ("invocations", "unknown_invocation", TokenSource.NONE)
    _, ev, _, _ = run("/invocations", b"{broken", 400, [b"{}"])
    assert ev.endpoint == "invocations" and ev.error == "malformed_request_json"
    _, ev, _, _ = run("/invocations", b"[1]", 400, [b"{}"])
    assert ev.error == "malformed_request_json"

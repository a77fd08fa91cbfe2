"""/pooling and /classify: UsageInfo, input tokens only; the fallback counts `input` (or the
chat messages /pooling accepts)."""

from __future__ import annotations

import orjson
import pytest

from extproc.events import TokenSource
from tests.processor_helpers import TOKENIZERS, run


@pytest.mark.parametrize(("path", "endpoint"), [("/pooling", "pooling"), ("/classify", "classify")])
def test_usage(path, endpoint):
    body = orjson.dumps({"id": "p", "object": "list", "model": "m", "data": [{"index": 0}, {"index": 1}],
                         "usage": {"prompt_tokens": 8, "total_tokens": 8, "completion_tokens": 0}})
    _, ev, _, _ = run(path, {"model": "m", "input": ["a", "b"]}, 200, [body])
    assert (ev.endpoint, ev.operation, ev.prompt_tokens, ev.response_events) == (endpoint, endpoint, 8, 2)
    assert ev.token_source == TokenSource.UPSTREAM_USAGE and not ev.stream


def test_stream_flag_is_ignored_and_fallbacks():
    c = TOKENIZERS.for_model("m")
    _, ev, _, answer = run("/classify", {"model": "m", "input": "hello world", "stream": True}, 200, [b"{}"])
    assert not ev.stream and not ev.usage_injected
    assert answer.request_body.response.body_mutation.WhichOneof("mutation") is None
    assert ev.token_source == TokenSource.TOKENIZER and ev.prompt_tokens == c.count("hello world")
    _, ev, _, _ = run("/pooling", {"model": "m", "messages": [{"role": "user", "content": "hi there"}]}, 200, [b"{}"])
    assert ev.prompt_tokens == c.count("hi there")
    _, ev, _, _ = run("/pooling", {"model": "m", "input": [5, 6, 7]}, 200, [b"{}"])
    assert ev.prompt_tokens == 3


def test_bad_response_is_flagged():
    _, ev, _, _ = run("/classify", {"model": "m", "input": "x"}, 200, [b"<html>"])
    assert ev.error == "malformed_response"

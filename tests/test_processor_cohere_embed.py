"""/v2/embed (Cohere): usage in meta.billed_units, the fallback counts texts and text parts."""

from __future__ import annotations

import orjson

from extproc.events import TokenSource
from tests.processor_helpers import TOKENIZERS, run


def test_billed_units():
    body = orjson.dumps({"id": "e", "embeddings": {"float": [[0.1], [0.2]]}, "texts": ["a", "b"],
                         "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 6, "image_tokens": 4}}})
    _, ev, _, _ = run("/v2/embed", {"model": "m", "texts": ["a", "b"]}, 200, [body])
    assert (ev.endpoint, ev.operation, ev.prompt_tokens, ev.total_tokens) == ("cohere_embed", "embeddings", 10, 10)
    assert ev.token_source == TokenSource.UPSTREAM_USAGE and ev.response_events == 2


def test_fallback_and_openai_usage_ignored():
    c = TOKENIZERS.for_model("m")
    req = {"model": "m", "texts": ["hello"], "inputs": [{"content": [{"type": "text", "text": "world"},
                                                                     {"type": "image_url", "image_url": {}}]}]}
    _, ev, _, _ = run("/v2/embed", req, 200, [b'{"usage": {"prompt_tokens": 99}, "meta": {}}'])
    assert ev.token_source == TokenSource.TOKENIZER
    assert ev.prompt_tokens == c.count("hello") + c.count("world")

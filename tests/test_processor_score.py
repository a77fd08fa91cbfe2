"""/score, /v1/score: UsageInfo, the fallback counts both sides of every pair (one against many,
item by item; text_1/text_2, queries/documents or data_1/data_2)."""

from __future__ import annotations

import orjson
import pytest

from extproc.events import TokenSource
from tests.processor_helpers import TOKENIZERS, run


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_usage(path):
    body = orjson.dumps({"id": "s", "object": "list", "model": "m", "data": [{"index": 0, "score": 0.5}],
                         "usage": {"prompt_tokens": 14, "total_tokens": 14, "completion_tokens": 0}})
    _, ev, _, _ = run(path, {"model": "m", "text_1": "a", "text_2": ["b", "c"]}, 200, [body])
    assert (ev.endpoint, ev.operation, ev.prompt_tokens, ev.total_tokens) == ("score", "score", 14, 14)
    assert ev.token_source == TokenSource.UPSTREAM_USAGE


@pytest.mark.parametrize(("req", "texts"), [
    ({"text_1": "q", "text_2": ["d one", "d two"]}, ["q", "q", "d one", "d two"]),
    ({"text_1": ["a", "b"], "text_2": ["c", "d"]}, ["a", "b", "c", "d"]),
    ({"queries": "q", "documents": ["x"]}, ["q", "x"]),
    ({"data_1": [1, 2, 3], "data_2": "y"}, [[1, 2, 3], "y"]),
])
def test_fallback(req, texts):
    _, ev, _, _ = run("/score", {"model": "m", **req}, 200, [b"{}"])
    c = TOKENIZERS.for_model("m")
    assert ev.token_source == TokenSource.TOKENIZER
    assert ev.prompt_tokens == sum(c.count(t) if isinstance(t, str) else len(t) for t in texts)

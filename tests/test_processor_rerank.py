"""/rerank, /v1/rerank, /v2/rerank: usage with and without prompt_tokens, the fallback counts
the query once per document, an error is flagged."""

from __future__ import annotations

import orjson
import pytest

from extproc.events import TokenSource
from tests.processor_helpers import TOKENIZERS, run

REQ = {"model": "m", "query": "gpu billing", "documents": ["per team", {"text": "per hour"}]}


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize(("usage", "prompt"), [({"prompt_tokens": 12, "total_tokens": 12}, 12), ({"total_tokens": 9}, 9)])
def test_usage(path, usage, prompt):
    body = orjson.dumps({"id": "r", "model": "m", "usage": usage, "results": [{"index": 0, "relevance_score": 0.9}]})
    _, ev, _, _ = run(path, REQ, 200, [body])
    assert (ev.endpoint, ev.operation, ev.token_source) == ("rerank", "rerank", TokenSource.UPSTREAM_USAGE)
    assert (ev.prompt_tokens, ev.completion_tokens, ev.total_tokens, ev.response_events) == (prompt, 0, prompt, 1)


def test_fallback_counts_query_per_document():
    _, ev, _, _ = run("/v1/rerank", REQ, 200, [b'{"id": "r", "results": []}'])
    c = TOKENIZERS.for_model("m")
    assert ev.token_source == TokenSource.TOKENIZER
    assert ev.prompt_tokens == 2 * c.count("gpu billing") + c.count("per team") + c.count("per hour")


def test_errors():
    _, ev, _, _ = run("/v1/rerank", REQ, 400, [b'{"error": {"message": "documents cannot be empty"}}'])
    assert ev.error == "upstream_error" and "documents" in ev.error_detail and ev.token_source == TokenSource.NONE
    _, ev, _, _ = run("/v1/rerank", b"not json", 200, [b"{}"])
    assert ev.error == "malformed_request_json" and ev.token_source == TokenSource.NONE

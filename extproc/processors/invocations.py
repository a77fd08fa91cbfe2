"""/invocations (SageMaker style): vLLM picks the handler by the body's shape, trying chat,
completion, embedding, classification, score, rerank and pooling requests in that order (the
first that validates wins). The same order here, by the field each of those requires; the
chosen route's processor then meters the request (Exchange takes `delegate` over). A body of
none of these shapes is answered 400 by vLLM, and stays an `invocations` event."""

from __future__ import annotations

from typing import Any

import orjson

from extproc.processors.base import EndpointProcessor, RequestError
from extproc.processors.chat import ChatProcessor
from extproc.processors.completions import CompletionsProcessor
from extproc.processors.embeddings import EmbeddingsProcessor
from extproc.processors.rerank import RerankProcessor
from extproc.processors.score import ScoreProcessor, score_pairs


def processor_class(body: dict[str, Any]) -> type[EndpointProcessor] | None:
    if "messages" in body:
        return ChatProcessor
    if "prompt" in body:
        return CompletionsProcessor
    if "input" in body:
        # classification and pooling bodies have the same shape and usage; vLLM tries
        # embeddings first, so they are metered as embeddings
        return EmbeddingsProcessor
    if score_pairs(body) is not None:
        return ScoreProcessor
    if "query" in body and "documents" in body:
        return RerankProcessor
    return None


class InvocationsProcessor(EndpointProcessor):
    endpoint = "invocations"

    def on_request_body(self, body: bytes, rewrite: bool = True) -> bytes | None:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RequestError("malformed_request_json", f"request body is not JSON: {exc}") from None
        cls = processor_class(req) if isinstance(req, dict) else None
        if cls is None:
            super().on_request_body(body, rewrite=False)  # raises on a non-object
            self._flag("unknown_invocation", "the body matches none of the request shapes vLLM dispatches")
            return None
        self.delegate = cls(self.ctx)
        return self.delegate.on_request_body(body, rewrite)

    def _on_stream_choice(self, choice: dict[str, Any], now_ns: int) -> None:
        pass

    def _on_json_response(self, obj: dict[str, Any]) -> None:
        pass

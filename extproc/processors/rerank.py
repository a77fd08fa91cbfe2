"""/rerank, /v1/rerank, /v2/rerank (Jina / Cohere style): usage {prompt_tokens, total_tokens}
(older vLLM: total_tokens only). The model reads the query paired with each document, so the
fallback counts the query once per document."""

from __future__ import annotations

from extproc.processors.input_only import InputOnlyProcessor, texts_of


class RerankProcessor(InputOnlyProcessor):
    endpoint = "rerank"
    operation = "rerank"

    def input_texts(self) -> list[str | list[int]]:
        query = texts_of(self.request.get("query"))
        docs = self.request.get("documents")
        docs = [d for doc in docs for d in texts_of(doc)] if isinstance(docs, list) else []
        return [*(query * len(docs)), *docs]

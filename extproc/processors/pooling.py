"""/pooling and /classify: `input` as for embeddings (or chat `messages` for /pooling), usage
vLLM's UsageInfo, input tokens only."""

from __future__ import annotations

from extproc.processors.chat import _content_text
from extproc.processors.input_only import InputOnlyProcessor, texts_of


class PoolingProcessor(InputOnlyProcessor):
    endpoint = "pooling"
    operation = "pooling"

    def input_texts(self) -> list[str | list[int]]:
        messages = self.request.get("messages")
        if isinstance(messages, list):
            return [_content_text(m.get("content")) for m in messages if isinstance(m, dict)]
        return texts_of(self.request.get("input"))


class ClassifyProcessor(PoolingProcessor):
    endpoint = "classify"
    operation = "classify"

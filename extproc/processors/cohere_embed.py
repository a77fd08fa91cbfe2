"""/v2/embed (Cohere Embed v2 as vLLM serves it): usage in meta.billed_units (input_tokens, plus
image_tokens for images); the fallback counts `texts` (or the text parts of `inputs`)."""

from __future__ import annotations

from typing import Any

from extproc.processors.base import Usage, _as_int
from extproc.processors.input_only import InputOnlyProcessor, texts_of


class CohereEmbedProcessor(InputOnlyProcessor):
    endpoint = "cohere_embed"
    operation = "embeddings"

    def _on_json_response(self, obj: dict[str, Any]) -> None:
        self.usage = None  # the base class looked for an OpenAI `usage`
        meta = obj.get("meta")
        billed = meta.get("billed_units") if isinstance(meta, dict) else None
        if isinstance(billed, dict):
            tokens = _as_int(billed.get("input_tokens")) + _as_int(billed.get("image_tokens"))
            self.usage = Usage(prompt=tokens, total=tokens)
        embeddings = obj.get("embeddings")
        if isinstance(embeddings, dict):
            lengths = [len(v) for v in embeddings.values() if isinstance(v, list)]
            self.response_events = max(lengths, default=0)

    def input_texts(self) -> list[str | list[int]]:
        texts = texts_of(self.request.get("texts"))
        inputs = self.request.get("inputs")
        for item in inputs if isinstance(inputs, list) else ():
            content = item.get("content") if isinstance(item, dict) else None
            for part in content if isinstance(content, list) else ():
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
        return texts

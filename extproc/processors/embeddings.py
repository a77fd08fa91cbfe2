"""/v1/embeddings: input tokens only, never streamed."""

from __future__ import annotations

from typing import Any

from extproc.events import TokenSource, UsageEvent
from extproc.processors.base import EndpointProcessor


class EmbeddingsProcessor(EndpointProcessor):
    endpoint = "embeddings"
    operation = "embeddings"
    streams = False
    has_output = False

    def _on_stream_choice(self, choice: dict[str, Any], now_ns: int) -> None:
        pass  # embeddings never stream

    def _on_json_response(self, obj: dict[str, Any]) -> None:
        data = obj.get("data")
        self.response_events = len(data) if isinstance(data, list) else 0

    def prompt_text(self) -> str:
        """The string inputs (for a budget's estimate before the upstream answers)."""
        inputs = self.request.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        return "\n".join(i for i in items if isinstance(i, str))

    def _fill_tokens(self, ev: UsageEvent) -> None:
        if self.usage is not None:
            ev.token_source = TokenSource.UPSTREAM_USAGE
            ev.prompt_tokens = self.usage.prompt
            ev.total_tokens = self.usage.total or self.usage.prompt
            return
        if self.error or not self.request:
            ev.token_source = TokenSource.NONE
            return
        counter = self.ctx.tokenizers.for_model(self.request_model)
        inputs = self.request.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        total = 0
        for item in items:
            if isinstance(item, str):
                total += counter.count(item)
            elif isinstance(item, list):  # pre-tokenized ids
                total += len(item) if all(isinstance(t, int) for t in item) else 0
            elif isinstance(item, int):
                total += 1  # one flat list of ids: each element is a token
        ev.prompt_tokens = ev.total_tokens = total
        ev.token_source = TokenSource.TOKENIZER
        ev.tokenizer = counter.name

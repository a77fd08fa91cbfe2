"""What vLLM's pooling-model routes share (rerank, score, classify, pooling, Cohere embed):
one JSON answer, input tokens only, never streamed. Usage is vLLM's UsageInfo (prompt_tokens,
total_tokens) unless a subclass reads another shape; without it the request's texts are counted
(a token-id list counts its length)."""

from __future__ import annotations

from typing import Any

from extproc.events import TokenSource, UsageEvent
from extproc.processors.base import EndpointProcessor


def texts_of(value: Any) -> list[str | list[int]]:
    """A string, a list of strings, a token-id list or a list of those, as vLLM accepts them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [value]
        return [v for v in value if isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, int) for t in v))]
    if isinstance(value, dict) and isinstance(value.get("text"), str):  # a rerank/score document object
        return [value["text"]]
    return []


class InputOnlyProcessor(EndpointProcessor):
    streams = False
    has_output = False

    def _on_stream_choice(self, choice: dict[str, Any], now_ns: int) -> None:
        pass  # never streamed

    def _on_json_response(self, obj: dict[str, Any]) -> None:
        data = obj.get("data", obj.get("results"))
        self.response_events = len(data) if isinstance(data, list) else 0

    def input_texts(self) -> list[str | list[int]]:
        """What the model reads, for the tokenizer fallback."""
        return texts_of(self.request.get("input"))

    def prompt_text(self) -> str:
        return "\n".join(t for t in self.input_texts() if isinstance(t, str))

    def _fill_tokens(self, ev: UsageEvent) -> None:
        if self.usage is not None:
            ev.token_source = TokenSource.UPSTREAM_USAGE
            # vLLM's older RerankUsage has total_tokens only
            ev.prompt_tokens = self.usage.prompt or self.usage.total
            ev.total_tokens = self.usage.total or ev.prompt_tokens
            return
        if self.error or not self.request:
            ev.token_source = TokenSource.NONE
            return
        counter = self.ctx.tokenizers.for_model(self.request_model)
        ev.prompt_tokens = ev.total_tokens = sum(
            counter.count(t) if isinstance(t, str) else len(t) for t in self.input_texts())
        ev.token_source = TokenSource.TOKENIZER
        ev.tokenizer = counter.name
